"""Wire types of the team routes (/v1/teams, /v1/admin/teams)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from llm_api.schemas.accounts import ApiKeyInfo, Name, Strict

TeamRole = Literal["owner", "admin", "member"]


class TeamCreate(Strict):
    name: Name


class TeamUpdate(Strict):
    name: Name


class MemberAdd(Strict):
    role: TeamRole = "member"


class MemberUpdate(Strict):
    role: TeamRole


class TeamMemberInfo(BaseModel):
    user_id: str
    object: Literal["team.member"] = "team.member"
    email: str
    role: TeamRole
    created_at: int


class TeamInfo(BaseModel):
    id: str
    object: Literal["team"] = "team"
    name: str
    created_at: int
    role: TeamRole | None = Field(None, description="The caller's role (None for site admins).")
    members: list[TeamMemberInfo] = Field(default_factory=list)
    keys: list[ApiKeyInfo] = Field(default_factory=list, description="The team's active keys.")


class TeamList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TeamInfo]


class TeamMemberList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TeamMemberInfo]


class DeletedTeam(BaseModel):
    id: str
    object: Literal["team"] = "team"
    deleted: bool = True


class DeletedMember(BaseModel):
    user_id: str
    object: Literal["team.member"] = "team.member"
    deleted: bool = True
