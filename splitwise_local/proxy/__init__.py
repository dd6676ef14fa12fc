"""The OpenAI-compatible front door: prefill on one engine, then decode on another.

`app.build_app(ProxySettings(...))` is the Starlette app (the launcher mounts it in-process);
`server` is the `proxy` subcommand that serves it with uvicorn.
"""
