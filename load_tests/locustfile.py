"""Locust load test for the dsv4 ensemble, over gRPC streaming or HTTP ``generate_stream``.

The protocol follows the host's scheme::

    locust -f load_tests/locustfile.py --headless -u 8 -r 8 -t 60s --host grpc://127.0.0.1:8001 \\
        --scenario short_chat --raw-out runs/short_chat.jsonl
    locust -f load_tests/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \\
        --scenario long_prompt
    locust -f load_tests/locustfile.py --headless -u 4 -r 4 -t 60s --host openai://127.0.0.1:9000 \\
        --scenario short_chat      # through dsv4-openai, the path AIPerf and the OpenAI SDKs take

Per request it fires one real event (request_type "gRPC", "HTTP" or "OpenAI", response time = end to
end, failure = any error; abandoned requests are named "<kind> [cancelled]") and pseudo-events
of request_type "METRIC" named "ttft" and "itl" (genai-perf definitions) that Locust keeps out
of its "Aggregated" totals. Every request is also written, unrounded, to the JSONL file of
``--raw-out`` / ``DSV4_RAW_OUT`` for ``python -m load_tests.report``.
"""

from __future__ import annotations

# grpc must be switched to gevent before any channel exists
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from locust import HttpUser, User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

try:
    import load_tests  # noqa: F401
except ImportError:  # run by path from elsewhere: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.client import ClientError, GenerationRequest, GrpcClient, parse_url  # noqa: E402
from dsv4.client.types import ServerError, StreamChunk  # noqa: E402
from dsv4.client.http_client import SSEEvent, SSEParser, chunk_from_event, error_from_body, iter_body  # noqa: E402
from load_tests.openai_events import chunk_from_openai, request_body  # noqa: E402
from load_tests.samples import SampleWriter, Trace  # noqa: E402
from load_tests.scenario import Pacer, RequestSpec, Scenario, load_scenario  # noqa: E402

METRIC = "METRIC"
DEFAULT_HOST = "grpc://127.0.0.1:8001"
OPENAI_SCHEME = "openai://"  # an OpenAI-compatible front end over plain HTTP (dsv4-openai)
log = logging.getLogger("dsv4.load")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--scenario", default=os.environ.get("DSV4_SCENARIO", "short_chat"),
                       help="scenario name in load_tests/scenarios/ or a JSON path (env DSV4_SCENARIO)",
                       include_in_web_ui=True)
    parser.add_argument("--raw-out", default=os.environ.get("DSV4_RAW_OUT", ""),
                       help="JSONL file for raw per-request samples (env DSV4_RAW_OUT; "
                            "default runs/<scenario>-<time>.jsonl)")
    parser.add_argument("--model", default=os.environ.get("DSV4_MODEL", "dsv4"), help="model name (env DSV4_MODEL)")
    parser.add_argument("--run-id", default=os.environ.get("DSV4_RUN_ID", ""),
                       help="label stored in every sample (env DSV4_RUN_ID)")


class _State:
    """What the users of this process share: set once in the init hook."""

    scenario: Scenario
    writer: SampleWriter
    model: str = "dsv4"
    run_id: str = ""
    protocol: str = "grpc"
    address: str = ""
    late_starts: int = 0
    user_ids = itertools.count()


STATE = _State()


def _keep_metrics_out_of_totals(environment: Environment) -> None:
    stats = environment.stats

    def log_request(method: str, name: str, response_time: float, content_length: int) -> None:
        if method != METRIC:
            stats.total.log(response_time, content_length)
        stats.entries[(name, method)].log(response_time, content_length)

    stats.log_request = log_request  # type: ignore[method-assign]


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    host = environment.host or DEFAULT_HOST
    openai = host.lower().startswith(OPENAI_SCHEME)
    endpoint = parse_url("http://" + host[len(OPENAI_SCHEME):] if openai else host)
    STATE.protocol = "openai" if openai else endpoint.protocol
    STATE.address = endpoint.address
    STATE.scenario = load_scenario(options.scenario if options else "short_chat")
    STATE.model = options.model if options else "dsv4"
    STATE.run_id = (options.run_id if options else "") or time.strftime("%Y%m%d-%H%M%S")
    raw = (options.raw_out if options else "") or f"runs/{STATE.scenario.name}-{STATE.run_id}.jsonl"
    if environment.runner is not None and type(environment.runner).__name__ == "WorkerRunner":
        raw = f"{raw}.{environment.runner.client_id}"
    STATE.writer = SampleWriter(raw)

    wanted = {"grpc": GrpcStreamUser, "http": HttpStreamUser, "openai": OpenAIStreamUser}[STATE.protocol]
    if wanted is not GrpcStreamUser:
        wanted.host = endpoint.address
    environment.user_classes[:] = [
        c for c in environment.user_classes if c is wanted or c not in (GrpcStreamUser, HttpStreamUser, OpenAIStreamUser)
    ]
    if wanted not in environment.user_classes:
        raise SystemExit(f"host {host!r} needs {wanted.__name__}, which was not selected")
    _keep_metrics_out_of_totals(environment)
    log.info("dsv4 load test: scenario=%s protocol=%s host=%s raw=%s", STATE.scenario.name, STATE.protocol,
             endpoint.address, raw)


@events.quitting.add_listener
def _on_quit(environment: Environment, **_: Any) -> None:
    writer = getattr(STATE, "writer", None)
    if writer is not None:
        writer.close()
        log.info("dsv4: %d raw samples in %s", writer.count, writer.path)
    if STATE.late_starts:
        log.warning("dsv4: %d Poisson arrivals started late (users were busy): add users to hold the rate",
                    STATE.late_starts)


class _Driver:
    """Scenario logic shared by both user classes: choose, pace, record."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.user_id = next(STATE.user_ids)
        self.rng = random.Random(STATE.scenario.seed * 1_000_003 + self.user_id)
        self.serial = itertools.count()
        options = user.environment.parsed_options
        users = getattr(options, "num_users", None) or 1
        self.pacer = Pacer(STATE.scenario.pacing, self.rng, users)

    def next_request(self) -> tuple[RequestSpec, GenerationRequest, int | None]:
        scenario = STATE.scenario
        spec = scenario.pick(self.rng)
        request = scenario.build_request(spec, self.rng, next(self.serial))
        self.pacer.started()
        return spec, request, scenario.cancel_after(self.rng)

    def wait_s(self) -> float:
        late = self.pacer.late
        wait = self.pacer.wait_s()
        STATE.late_starts += self.pacer.late - late
        return wait

    def record(self, spec: RequestSpec, trace: Trace, *, end_perf: float, cancelled: bool,
               error: BaseException | None) -> tuple[str, float]:
        """Write the raw sample and fire the METRIC events; returns the request's name and e2e ms."""
        status = "error" if error is not None else ("cancelled" if cancelled else "ok")
        runner = self.user.environment.runner
        sample = trace.sample(
            end_perf=end_perf, status=status, error=error, run_id=STATE.run_id, scenario=STATE.scenario.name,
            protocol=STATE.protocol, request_name=spec.name, user_id=self.user_id,
            users=runner.user_count if runner is not None else 0,
        )
        STATE.writer.write(sample)
        name = f"{spec.name} [cancelled]" if cancelled else spec.name
        e2e_ms = ((sample.t_last or trace.t0_wall) - trace.t0_wall) * 1000.0
        fire = self.user.environment.events.request.fire
        if error is None and trace.first_rel is not None:
            ttft_ms = trace.first_rel * 1000.0
            fire(request_type=METRIC, name="ttft", response_time=ttft_ms, response_length=0, exception=None,
                 context={})
            n = trace.num_output_tokens
            if not cancelled and n > 1 and trace.last_rel is not None:
                itl_ms = (trace.last_rel - trace.first_rel) * 1000.0 / (n - 1)
                fire(request_type=METRIC, name="itl", response_time=itl_ms, response_length=0, exception=None,
                     context={})
        return name, e2e_ms


class GrpcStreamUser(User):
    """One gRPC stream per user (one ``GrpcClient``), one request in flight at a time."""

    def wait_time(self) -> float:
        return self.driver.wait_s()

    def on_start(self) -> None:
        self.driver = _Driver(self)
        self.client = GrpcClient(STATE.address, model=STATE.model)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        spec, request, cancel_after = self.driver.next_request()
        trace = Trace(time.time(), time.perf_counter())
        error: BaseException | None = None
        cancelled = False
        try:
            stream = self.client.stream(request)
            for chunk in stream:
                trace.add(chunk)
                if cancel_after is not None and trace.num_output_tokens >= cancel_after and not chunk.finish_reason:
                    stream.cancel()
                    cancelled = True
                    break
        except ClientError as e:
            error = e
        end = time.perf_counter()
        name, e2e_ms = self.driver.record(spec, trace, end_perf=end, cancelled=cancelled, error=error)
        self.environment.events.request.fire(
            request_type="gRPC", name=name, response_time=e2e_ms, response_length=trace.text_bytes,
            exception=error, context={"user_id": self.driver.user_id},
        )


class HttpStreamUser(HttpUser):
    """POSTs to ``generate_stream`` and reads the SSE events as they arrive."""

    host = "http://127.0.0.1:8000"

    def wait_time(self) -> float:
        return self.driver.wait_s()

    def on_start(self) -> None:
        self.driver = _Driver(self)
        self.path = f"/v2/models/{STATE.model}/generate_stream"

    @task
    def generate(self) -> None:
        spec, request, cancel_after = self.driver.next_request()
        body = {"id": f"u{self.driver.user_id}-{time.monotonic_ns()}", **request.input_values(stream=True)}
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        trace = Trace(time.time(), time.perf_counter())
        error: BaseException | None = None
        cancelled = False
        with self.client.post(self.path, json=body, headers=headers, stream=True, catch_response=True,
                              name=spec.name, timeout=(10.0, STATE.scenario.timeout_s)) as response:
            try:
                if response.status_code != 200:
                    error = error_from_body(response.status_code, response.content or b"")
                else:
                    cancelled = _read_events(response, trace, cancel_after, chunk_from_event)
            except ClientError as e:
                error = e
            except Exception as e:  # connection dropped, read timeout
                error = e
            end = time.perf_counter()
            name, e2e_ms = self.driver.record(spec, trace, end_perf=end, cancelled=cancelled, error=error)
            response.request_meta["request_type"] = "HTTP"
            response.request_meta["name"] = name
            response.request_meta["response_time"] = e2e_ms
            response.request_meta["response_length"] = trace.text_bytes
            if error is None:
                response.success()
            else:
                response.failure(error)


class OpenAIStreamUser(HttpUser):
    """POSTs streamed chat (or text) completions to an OpenAI-compatible front end and reads its
    server-sent events; token counts come from the `token_ids` the server returns. The key, if the
    front end asks for one, comes from DSV4_OPENAI_API_KEY."""

    host = "http://127.0.0.1:9000"

    def wait_time(self) -> float:
        return self.driver.wait_s()

    def on_start(self) -> None:
        self.driver = _Driver(self)
        self.client.base_url = STATE.address  # --host is openai://..., which requests cannot open
        key = os.environ.get("DSV4_OPENAI_API_KEY")
        self.headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity",
                        **({"Authorization": f"Bearer {key}"} if key else {})}

    @task
    def generate(self) -> None:
        spec, request, cancel_after = self.driver.next_request()
        path, body = request_body(request, STATE.model)
        trace = Trace(time.time(), time.perf_counter())
        error: BaseException | None = None
        cancelled = False
        with self.client.post(path, json=body, headers=self.headers, stream=True, catch_response=True,
                              name=spec.name, timeout=(10.0, STATE.scenario.timeout_s)) as response:
            try:
                if response.status_code != 200:
                    error = ServerError(f"HTTP {response.status_code}: {(response.content or b'')[:300]!r}")
                else:
                    cancelled = _read_events(response, trace, cancel_after, chunk_from_openai)
            except Exception as e:  # an error event, a dropped connection, a read timeout
                error = e
            name, e2e_ms = self.driver.record(spec, trace, end_perf=time.perf_counter(), cancelled=cancelled,
                                              error=error)
            response.request_meta.update(request_type="OpenAI", name=name, response_time=e2e_ms,
                                         response_length=trace.text_bytes)
            if error is None:
                response.success()
            else:
                response.failure(error)


def _read_events(response: Any, trace: Trace, cancel_after: int | None,
                 to_chunk: Callable[[SSEEvent, float], StreamChunk | None]) -> bool:
    """Add each server-sent event's chunk to `trace` as it arrives (`to_chunk` gives None for events
    without one); True when the stream was abandoned after `cancel_after` tokens."""
    parser = SSEParser()
    for data in iter_body(response.raw):
        now = time.perf_counter()
        for event in parser.feed(data):
            chunk = to_chunk(event, now)
            if chunk is None:
                continue
            trace.add(chunk)
            if cancel_after is not None and trace.num_output_tokens >= cancel_after and not chunk.finish_reason:
                response.close()
                return True
    for event in parser.close():
        chunk = to_chunk(event, time.perf_counter())
        if chunk is not None:
            trace.add(chunk)
    return False
