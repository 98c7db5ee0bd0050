"""`ti-fast serve`: one loaded model for many clients, a job queue that survives restarts, A1111's API.

Training jobs co-batched in one group, a job queue in SQLite, txt2img between steps,
A1111-compatible routes.

    settings.py     ServeSettings, the process-wide keys, the loopback/token rule (torch-free)
    cli.py          `ti-fast serve` (parser torch-free; the command binds, loads, serves, stops)
    state.py        ServerState: home, store, hub, worker — passed to the app factory
    app.py          create_app(state): gate, JSON errors, routes, the self-served API page
    security.py     the gate: paths, Host/Origin (DNS rebinding, cross-site), token, body limits
    home.py         the home folder and every path resolved inside it (no .., no links)
    uploads.py      multipart/zip uploads streamed into HOME/tmp, checked, installed as datasets
    store.py        the job table (sqlite3, WAL)
    jobs.py         request settings -> a run's TrainConfig keys; submit, requeue; the public record
    worker.py       the worker thread: the one owner of the model; group steps, calls between them
    events.py       progress events across threads; Server-Sent Events
    api_library.py  /api/v1: server, login, datasets, embeddings, hypernetworks, txt2img, outputs
    api_jobs.py     /api/v1/jobs: submit, cancel, resume, events (SSE), files, loss, previews
    a1111.py        A1111's fields <-> ti-fast's (pure)
    api_a1111.py    /sdapi/v1 routes
    static/         the API page (HTML, CSS, JS) — no CDN

Nothing is imported here, so that `ti-fast --help` stays torch- and fastapi-free.
"""
