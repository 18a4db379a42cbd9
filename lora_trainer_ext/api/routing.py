"""How every API route answers: failures as {"error": message} with the right status (Busy: 409),
whatever handlers the host app installed, and the WebUI API's HTTP Basic check."""

from __future__ import annotations

from secrets import compare_digest

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.exceptions import HTTPException

from ..errors import Busy, LoraMakerError


class Refused(Exception):
    """An answer other than 400: `status` with `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _invalid_body(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        parts.append(f"{where}: {err['msg']}")
    return "bad request: " + "; ".join(parts)


class Route(APIRoute):
    """A route answering every failure itself as {"error": ...}, whatever handlers the host app has
    (the WebUI's `--api` replaces FastAPI's own and drops the WWW-Authenticate header)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Refused as e:
                return _error(e.status, str(e))
            except Busy as e:  # a job is running (on this project): the Studio's one refusal
                return _error(409, str(e))
            except LoraMakerError as e:
                return _error(400, str(e))
            except RequestValidationError as e:
                return _error(400, _invalid_body(e))
            except HTTPException as e:  # the auth dependency's 401
                return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None), detail=e.detail)
            except OSError as e:
                return _error(500, f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")

        return answer


def basic_auth(credentials: dict[str, str]):
    """The WebUI API's check: HTTP Basic, passwords compared in constant time."""

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        # Compared even for an unknown user, so timing doesn't tell which users exist.
        same = compare_digest(given.password.encode("utf-8"), (expected or "").encode("utf-8"))
        if expected is not None and same:
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return auth
