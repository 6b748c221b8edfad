"""OpenAI-shaped error answers: raised anywhere in a handler, rendered by one middleware."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An OpenAI-shaped error answer, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_
        self.headers = headers or {}
        self.param = param

    def response(self) -> web.Response:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        body = {"error": error}
        return web.json_response(body, status=self.status, headers=self.headers)


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
