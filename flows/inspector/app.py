"""The inspector's web app: a JSON API over RunData and the static page (flows/inspector/static/).

Every answer the page cannot use is `{"error": one line}` with a 4xx status (an unknown document or latent, a
column this run does not have, a view that is not built: what to run), never a stack trace.
"""

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from flows.inspector import latents
from flows.inspector.data import InspectError, RunData

STATIC = Path(__file__).parent / "static"


def create_app(data: RunData) -> FastAPI:
    """The FastAPI app serving one run's data."""
    app = FastAPI(title="lmpipe inspect", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(InspectError)
    async def inspect_error(request: Request, err: InspectError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    @app.exception_handler(ValueError)  # the catalog's own explanations (a refused or unbuilt view)
    async def value_error(request: Request, err: ValueError):
        return JSONResponse({"error": str(err).splitlines()[0]}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"},
                            status_code=500)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/overview")
    def overview() -> dict:
        return data.overview()

    @app.get("/api/documents")
    def documents(split: str, q: str = "", order: str = "doc_id", model: str = "", limit: int = 50) -> list[dict]:
        return data.documents(split, q, order, model, limit)

    @app.get("/api/document")
    def document(split: str, doc_id: int, column: str | None = None) -> dict:
        return data.document(split, doc_id, column)

    @app.get("/api/latents")
    def latent_list(q: str = "", order: str = "labelled", limit: int = 50) -> list[dict]:
        return latents.latent_list(data, q, order, limit)

    @app.get("/api/latent/{concept_id}")
    def latent(concept_id: int) -> dict:
        return latents.latent(data, concept_id)

    @app.get("/api/run")
    def run() -> dict:
        return latents.run_summary(data)

    @app.get("/api/plot/{name}")
    def plot(name: str) -> Response:
        return Response(data.plot(name), media_type="image/png")

    return app
