"""``nbllm serve``: the guide's local server, OpenAI-compatible, on the process-wide engine.

    nbllm serve                                 # http://127.0.0.1:8000, OpenAI base URL .../v1
    handle = nbllm.serve(port=8001)             # the same from a notebook, in a background thread

Its modules, each using only those above it:

- ``addresses``: which host names are this machine's (loopback);
- ``options``: ``ServerOptions`` from the config and the command line, and ``nbllm serve``'s arguments;
- ``openai_format``: OpenAI's requests, answers and errors, as plain data;
- ``scheduler``: worker threads, a queue per model, clients that hang up;
- ``errors``: every failure as OpenAI's JSON error;
- ``security``: the API key, loopback/Host/Origin checks, the admin guard, the body size limit;
- ``routes``: the endpoints, and answers whole or as server-sent events;
- ``app``: ``create_app``, which wires them into one FastAPI app;
- ``running``: binding the port, ``ServerHandle`` (``nbllm.serve()``), ``run_server`` (``nbllm serve``).

fastapi and uvicorn are imported from ``errors`` on only: importing this package, ``options`` (as the
``nbllm`` parser does) or ``nbllm`` itself loads neither.
"""
