"""The Files API (`client.files`): upload batch input, list, read, download, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from llm_api.api.deps import BatchServiceDep, RequestCtx, StateDep, UserId
from llm_api.api.rate_limits import limit_request
from llm_api.api.scopes import requires_scope
from llm_api.schemas.batches import FileDeleted, FileList, FileObject
from llm_api.services.batches.service import file_object

router = APIRouter(tags=["files"])


@router.post("/files", response_model=FileObject)
@requires_scope("inference")
async def upload_file(
    user_id: UserId,
    batches: BatchServiceDep,
    state: StateDep,
    ctx: RequestCtx,
    response: Response,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    await limit_request(state, ctx, response)
    data = await file.read(batches.max_bytes + 1)
    row = await batches.upload(user_id, file.filename or "input.jsonl", purpose, data)
    return file_object(row)


@router.get("/files", response_model=FileList)
@requires_scope("inference")
async def list_files(
    user_id: UserId, batches: BatchServiceDep, purpose: Annotated[str | None, Query()] = None
) -> FileList:
    return FileList(data=[file_object(r) for r in await batches.list_files(user_id, purpose)])


@router.get("/files/{file_id}", response_model=FileObject)
@requires_scope("inference")
async def get_file(file_id: str, user_id: UserId, batches: BatchServiceDep) -> FileObject:
    return file_object(await batches.get_file(user_id, file_id))


@router.get("/files/{file_id}/content")
@requires_scope("inference")
async def file_content(file_id: str, user_id: UserId, batches: BatchServiceDep) -> Response:
    data = await batches.file_content(user_id, file_id)
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted)
@requires_scope("inference")
async def delete_file(file_id: str, user_id: UserId, batches: BatchServiceDep) -> FileDeleted:
    await batches.delete_file(user_id, file_id)
    return FileDeleted(id=file_id)
