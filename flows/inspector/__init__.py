"""`lmpipe inspect`: a local web page over one run's artifacts (documents coloured by per-token columns, SAE latent
dashboards, the run's plots), served by FastAPI on 127.0.0.1 from the sandboxed DuckDB catalog.

    serve.py    the command, opening the run (catalog, tokenizer, plots), the Prefect link artifact
    app.py      the JSON API and the static page
    data.py     document queries (bounded, parameterised); columns.py the per-token columns
    latents.py  latent dashboards and the run view's tables; pieces.py token ids -> text pieces
    static/     index.html, inspector.js, colors.js, inspector.css (no build step)
"""
