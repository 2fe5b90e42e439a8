"""One FastAPI app per system for ``python -m engine bench --http`` (``engine/cli/httpbench.py``).

Every app serves the same three endpoints, each wired the way its library's own docs show:

* ``GET /bare``: no session at all (the framework's floor);
* ``POST /login`` with ``{"user_id": ...}``: creates a session and sets its cookie;
* ``GET /me``: session-protected, answers ``{"user": <user id>}``; 401 without a session.

The benchmark runs each module as a top-level module (``uvicorn engine_app:app`` with this
directory as the working directory), so an older checkout of the engine can be put first on
``PYTHONPATH`` and measured by the same app code. Settings come from the environment.
Cookies keep each library's production defaults (``Secure``): the benchmark sends the cookie
itself, as ``name=value`` from the ``Set-Cookie`` of ``/login``.
"""
