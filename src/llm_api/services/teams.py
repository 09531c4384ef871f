"""Teams: users with roles (owner, admin, member) sharing service keys and their usage.

Who may do what (docs/security.md):
- every member sees the team, its members, its keys and its usage;
- owners and admins rename the team, add and remove members and make, change and revoke the
  team's keys; admins cannot touch owners or make anyone an owner; a team always keeps an
  owner; only owners delete the team;
- a member may leave (remove themselves), unless they are its last owner.
To anyone else a team does not exist: 404, never a 403 that would confirm it does.

A team key belongs to the team, not to the member who made it: removing that member leaves it
working (its `user_id` stays the creator's, for the record and for the owner-tier ceiling of
its limits), and from then on only the team's owners and admins manage it.

Never commits: the caller's session owns the transaction.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from llm_api.db.tables import ApiKey, Team, TeamMember, User
from llm_api.schemas.usage import UsageReport
from llm_api.services.usage import reports

TeamRole = Literal["owner", "admin", "member"]
MANAGERS: frozenset[str] = frozenset({"owner", "admin"})
MAX_TEAMS_PER_USER = 50


def _no_team() -> NotFoundError:
    return NotFoundError("No such team.", param="team_id")


async def role_of(db: AsyncSession, team_id: str, user_id: str | None) -> str | None:
    """The user's role in the team, or None (not a member, no such team, no user)."""
    if user_id is None:
        return None
    member = await db.get(TeamMember, (team_id, user_id))
    return member.role if member is not None else None


async def membership(db: AsyncSession, team_id: str, user_id: str) -> tuple[Team, str]:
    """The team and the user's role in it; 404 when the user is not a member (or no team)."""
    row = (
        await db.execute(
            select(Team, TeamMember.role)
            .join(TeamMember, TeamMember.team_id == Team.id)
            .where(Team.id == team_id, TeamMember.user_id == user_id)
        )
    ).first()
    if row is None:
        raise _no_team()
    return row[0], str(row[1])


async def managed(db: AsyncSession, team_id: str, user_id: str) -> tuple[Team, str]:
    """The team, if the user is its owner or admin: 404 for outsiders, 403 for members."""
    team, role = await membership(db, team_id, user_id)
    if role not in MANAGERS:
        raise PermissionDeniedError(
            "Only the team's owners and admins may do this.", code="team_role_required"
        )
    return team, role


async def owned(db: AsyncSession, team_id: str, user_id: str) -> Team:
    """The team, if the user is one of its owners: 404 for outsiders, 403 for the others."""
    team, role = await membership(db, team_id, user_id)
    if role != "owner":
        raise PermissionDeniedError(
            "Only the team's owners may do this.", code="team_role_required"
        )
    return team


async def create_team(db: AsyncSession, owner_id: str, name: str) -> Team:
    count = await db.scalar(
        select(func.count()).select_from(TeamMember).where(TeamMember.user_id == owner_id)
    )
    if int(count or 0) >= MAX_TEAMS_PER_USER:
        raise InvalidRequestError(f"A user may belong to at most {MAX_TEAMS_PER_USER} teams.")
    team = Team(name=name)
    db.add(team)
    await db.flush()
    db.add(TeamMember(team_id=team.id, user_id=owner_id, role="owner"))
    await db.flush()
    return team


async def teams_of(db: AsyncSession, user_id: str) -> list[tuple[Team, str]]:
    rows = await db.execute(
        select(Team, TeamMember.role)
        .join(TeamMember, TeamMember.team_id == Team.id)
        .where(TeamMember.user_id == user_id)
        .order_by(Team.created_at, Team.id)
    )
    return [(team, str(role)) for team, role in rows]


async def all_teams(db: AsyncSession, limit: int, offset: int) -> list[Team]:
    query = select(Team).order_by(Team.created_at, Team.id).limit(limit).offset(offset)
    return list((await db.execute(query)).scalars())


async def members(db: AsyncSession, team_ids: list[str]) -> list[tuple[TeamMember, User]]:
    rows = await db.execute(
        select(TeamMember, User)
        .join(User, User.id == TeamMember.user_id)
        .where(TeamMember.team_id.in_(team_ids))
        .order_by(TeamMember.created_at, User.email)
    )
    return [(m, u) for m, u in rows]


async def keys_of(db: AsyncSession, team_ids: list[str]) -> list[ApiKey]:
    """The teams' active keys."""
    query = (
        select(ApiKey)
        .where(ApiKey.team_id.in_(team_ids), ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return list((await db.execute(query)).scalars())


async def count_keys(db: AsyncSession, team_id: str) -> int:
    query = select(func.count()).where(ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None))
    return int((await db.execute(query)).scalar_one())


async def delete_team(db: AsyncSession, team_id: str) -> None:
    """The team, its memberships and its keys (explicitly: not every SQLite enforces the
    foreign keys' ON DELETE CASCADE). Its usage records stay, attributed to their keys' ids."""
    await db.execute(delete(ApiKey).where(ApiKey.team_id == team_id))
    await db.execute(delete(TeamMember).where(TeamMember.team_id == team_id))
    await db.execute(delete(Team).where(Team.id == team_id))


async def _user(db: AsyncSession, ref: str) -> User:
    """A user by id or e-mail address."""
    query = select(User).where(User.email == ref.strip().lower()) if "@" in ref else None
    user = (await db.execute(query)).scalar_one_or_none() if query is not None else None
    if user is None and "@" not in ref:
        user = await db.get(User, ref)
    if user is None or not user.is_active:
        raise NotFoundError("No such user.", param="user")
    return user


async def _member(db: AsyncSession, team_id: str, user_ref: str) -> tuple[TeamMember, User]:
    user = await _user(db, user_ref)
    member = await db.get(TeamMember, (team_id, user.id))
    if member is None:
        raise NotFoundError("That user is not a member of this team.", param="user")
    return member, user


def _check_grant(actor_role: str, role: str) -> None:
    if role == "owner" and actor_role != "owner":
        raise PermissionDeniedError(
            "Only the team's owners may make someone an owner.", code="team_role_required"
        )


async def _check_not_last_owner(db: AsyncSession, member: TeamMember) -> None:
    if member.role != "owner":
        return
    owners = await db.scalar(
        select(func.count())
        .select_from(TeamMember)
        .where(TeamMember.team_id == member.team_id, TeamMember.role == "owner")
    )
    if int(owners or 0) <= 1:
        raise ConflictError(
            "A team needs an owner: make another member an owner first.", code="last_owner"
        )


async def add_member(
    db: AsyncSession, team_id: str, actor_role: str, user_ref: str, role: TeamRole
) -> tuple[TeamMember, User]:
    _check_grant(actor_role, role)
    user = await _user(db, user_ref)
    if await db.get(TeamMember, (team_id, user.id)) is not None:
        raise ConflictError("That user is already a member of this team.", param="user")
    member = TeamMember(team_id=team_id, user_id=user.id, role=role)
    db.add(member)
    await db.flush()
    return member, user


async def set_role(
    db: AsyncSession, team_id: str, actor_role: str, user_ref: str, role: TeamRole
) -> tuple[TeamMember, User]:
    member, user = await _member(db, team_id, user_ref)
    _check_grant(actor_role, role)
    if member.role == "owner" and actor_role != "owner":
        raise PermissionDeniedError(
            "Only the team's owners may change an owner's role.", code="team_role_required"
        )
    if role != "owner":
        await _check_not_last_owner(db, member)
    member.role = role
    await db.flush()
    return member, user


async def remove_member(
    db: AsyncSession, team_id: str, actor_id: str, actor_role: str, user_ref: str
) -> User:
    """Owners and admins remove members (admins not owners); anyone may leave. The keys the
    member made for the team stay: they are the team's."""
    member, user = await _member(db, team_id, user_ref)
    if user.id != actor_id:
        if actor_role not in MANAGERS:
            raise PermissionDeniedError(
                "Only the team's owners and admins may remove members.",
                code="team_role_required",
            )
        if member.role == "owner" and actor_role != "owner":
            raise PermissionDeniedError(
                "Only the team's owners may remove an owner.", code="team_role_required"
            )
    await _check_not_last_owner(db, member)
    await db.delete(member)
    await db.flush()
    return user


async def usage_report(
    db: AsyncSession, team_id: str, start: date | None, end: date | None
) -> UsageReport:
    """The team's usage: the ledger's records made with its keys (revoked ones included), by
    day and model, with their cost."""
    return await reports.usage_report(db, start, end, team_id=team_id)
