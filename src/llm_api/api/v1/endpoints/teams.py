"""Teams: /v1/teams (one's teams, their members, keys and usage) and /v1/admin/teams (every
team, for administrators). Outsiders get 404 for a team; the rules are in services/teams.py.
Team routes need the `teams` scope; making a team's key needs `keys` (POST /v1/keys with
`team_id` is the same)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from llm_api.api.deps import AdminUser, AuthDep, CurrentUser, DbSession, SettingsDep, StateDep
from llm_api.api.rate_limits import limit_route
from llm_api.api.scopes import requires_scope
from llm_api.api.v1.endpoints.keys import audited, key_info
from llm_api.api.v1.endpoints.usage import END, START
from llm_api.db.tables import Team, TeamMember, User
from llm_api.schemas.accounts import ApiKeyCreate, ApiKeyCreated, ApiKeyList, epoch
from llm_api.schemas.teams import (
    DeletedMember,
    DeletedTeam,
    MemberAdd,
    MemberUpdate,
    TeamCreate,
    TeamInfo,
    TeamList,
    TeamMemberInfo,
    TeamMemberList,
    TeamUpdate,
)
from llm_api.schemas.usage import IsoDay, UsageReport
from llm_api.services import audit, teams
from llm_api.services.auth import key_management

router = APIRouter(tags=["teams"])


def _member_info(member: TeamMember, user: User) -> TeamMemberInfo:
    return TeamMemberInfo(
        user_id=user.id,
        email=user.email,
        role=member.role,  # type: ignore[arg-type]
        created_at=epoch(member.created_at),
    )


async def _details(db: DbSession, found: list[tuple[Team, str | None]]) -> list[TeamInfo]:
    """Teams with their members and active keys (two queries for all of them)."""
    ids = [team.id for team, _ in found]
    members = await teams.members(db, ids)
    keys = await teams.keys_of(db, ids)
    return [
        TeamInfo(
            id=team.id,
            name=team.name,
            created_at=epoch(team.created_at),
            role=role,  # type: ignore[arg-type]
            members=[_member_info(m, u) for m, u in members if m.team_id == team.id],
            keys=[key_info(k) for k in keys if k.team_id == team.id],
        )
        for team, role in found
    ]


async def _one(db: DbSession, team: Team, role: str) -> TeamInfo:
    return (await _details(db, [(team, role)]))[0]


def _uid(user: CurrentUser) -> str:
    assert user.user_id is not None  # CurrentUser has an account
    return user.user_id


@router.post("/teams", response_model=TeamInfo, status_code=201)
@requires_scope("teams")
async def create_team(
    body: TeamCreate, user: CurrentUser, db: DbSession, request: Request
) -> TeamInfo:
    """A new team, with the caller as its owner."""
    team = await teams.create_team(db, _uid(user), body.name)
    await audit.record(db, user, "team.created", team, after={"name": team.name}, request=request)
    return await _one(db, team, "owner")


@router.get("/teams", response_model=TeamList)
@requires_scope("teams")
async def list_teams(user: CurrentUser, db: DbSession) -> TeamList:
    """The teams the caller belongs to, with their role, members and keys."""
    found: list[tuple[Team, str | None]] = list(await teams.teams_of(db, _uid(user)))
    return TeamList(data=await _details(db, found))


@router.get("/teams/{team_id}", response_model=TeamInfo)
@requires_scope("teams")
async def get_team(team_id: str, user: CurrentUser, db: DbSession) -> TeamInfo:
    team, role = await teams.membership(db, team_id, _uid(user))
    return await _one(db, team, role)


@router.patch("/teams/{team_id}", response_model=TeamInfo)
@requires_scope("teams")
async def update_team(
    team_id: str, body: TeamUpdate, user: CurrentUser, db: DbSession, request: Request
) -> TeamInfo:
    team, role = await teams.managed(db, team_id, _uid(user))
    before = {"name": team.name}
    team.name = body.name
    await db.flush()
    await audit.record(
        db, user, "team.updated", team, before=before, after={"name": team.name}, request=request
    )
    return await _one(db, team, role)


@router.delete("/teams/{team_id}", response_model=DeletedTeam)
@requires_scope("teams")
async def delete_team(
    team_id: str, user: CurrentUser, db: DbSession, auth: AuthDep, request: Request
) -> DeletedTeam:
    """Delete the team (owners only) and revoke its keys."""
    await teams.owned(db, team_id, _uid(user))
    await teams.delete_team(db, team_id)
    target = audit.Target("team", team_id)
    await audit.record(db, user, "team.deleted", target, after={"deleted": True}, request=request)
    auth.authenticator.forget(db)  # its keys stop at once
    return DeletedTeam(id=team_id)


@router.get("/teams/{team_id}/members", response_model=TeamMemberList)
@requires_scope("teams")
async def list_members(team_id: str, user: CurrentUser, db: DbSession) -> TeamMemberList:
    await teams.membership(db, team_id, _uid(user))
    return TeamMemberList(data=[_member_info(m, u) for m, u in await teams.members(db, [team_id])])


@router.post("/teams/{team_id}/members/{user_ref}", response_model=TeamMemberInfo, status_code=201)
@requires_scope("teams")
async def add_member(
    team_id: str,
    user_ref: str,
    user: CurrentUser,
    db: DbSession,
    request: Request,
    body: MemberAdd | None = None,
) -> TeamMemberInfo:
    """Add a user (by id or e-mail) to the team (owners and admins)."""
    team, role = await teams.managed(db, team_id, _uid(user))
    member, added = await teams.add_member(db, team_id, role, user_ref, (body or MemberAdd()).role)
    after = {"user_id": added.id, "role": member.role}
    await audit.record(db, user, "team.member_added", team, after=after, request=request)
    return _member_info(member, added)


@router.patch("/teams/{team_id}/members/{user_ref}", response_model=TeamMemberInfo)
@requires_scope("teams")
async def update_member(
    team_id: str,
    user_ref: str,
    body: MemberUpdate,
    user: CurrentUser,
    db: DbSession,
    request: Request,
) -> TeamMemberInfo:
    team, role = await teams.managed(db, team_id, _uid(user))
    member, changed = await teams.set_role(db, team_id, role, user_ref, body.role)
    after = {"user_id": changed.id, "role": member.role}
    await audit.record(db, user, "team.member_role_changed", team, after=after, request=request)
    return _member_info(member, changed)


@router.delete("/teams/{team_id}/members/{user_ref}", response_model=DeletedMember)
@requires_scope("teams")
async def remove_member(
    team_id: str, user_ref: str, user: CurrentUser, db: DbSession, request: Request
) -> DeletedMember:
    """Remove a member (owners and admins), or leave (anyone). The team's keys stay."""
    team, role = await teams.membership(db, team_id, _uid(user))
    removed = await teams.remove_member(db, team_id, _uid(user), role, user_ref)
    after = {"user_id": removed.id}
    await audit.record(db, user, "team.member_removed", team, after=after, request=request)
    return DeletedMember(user_id=removed.id)


@router.get("/teams/{team_id}/keys", response_model=ApiKeyList)
@requires_scope("teams")
async def list_team_keys(team_id: str, user: CurrentUser, db: DbSession) -> ApiKeyList:
    """The team's active keys (every member sees them; never the keys themselves)."""
    await teams.membership(db, team_id, _uid(user))
    return ApiKeyList(data=[key_info(k) for k in await teams.keys_of(db, [team_id])])


@router.post("/teams/{team_id}/keys", response_model=ApiKeyCreated, status_code=201)
@requires_scope("keys")
async def create_team_key(
    team_id: str,
    user: CurrentUser,
    db: DbSession,
    settings: SettingsDep,
    state: StateDep,
    request: Request,
    body: ApiKeyCreate | None = None,
) -> ApiKeyCreated:
    """A team's service key (owners and admins): POST /v1/keys with this `team_id`."""
    await limit_route(request, "key_creation", user.user_id)
    wanted = (body or ApiKeyCreate()).model_copy(update={"team_id": team_id})
    key, raw = await key_management.create(
        db, user, wanted, state.rate_limiter.policy, settings.max_keys_per_user
    )
    await audit.record(db, user, "key.created", key, after=audited(key), request=request)
    return ApiKeyCreated(**key_info(key).model_dump(), key=raw)


@router.get("/teams/{team_id}/usage", response_model=UsageReport)
@requires_scope("teams")
async def team_usage(
    team_id: str,
    user: CurrentUser,
    db: DbSession,
    start: IsoDay | None = START,
    end: IsoDay | None = END,
) -> UsageReport:
    """The usage of the team's keys by day and model (every member)."""
    await teams.membership(db, team_id, _uid(user))
    return await teams.usage_report(db, team_id, start, end)


@router.get("/admin/teams", response_model=TeamList)
@requires_scope("admin")
async def all_teams(
    _: AdminUser,
    db: DbSession,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> TeamList:
    """Every team with its members and keys (administrators only)."""
    rows = await teams.all_teams(db, limit, offset)
    found: list[tuple[Team, str | None]] = [(t, None) for t in rows]
    return TeamList(data=await _details(db, found))
