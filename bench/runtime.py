"""Runtime cost: identity Predict vs a bare grpc.aio echo, and batching off vs on at concurrency 16.

Run: nice -n 10 python bench/runtime.py [--quick]

(a) round trip of `meshserve serve identity` vs a bare grpc.aio server echoing the same bytes,
    p50/p99 for 1 KB and 600 KB payloads; both are called the same way (pre-serialized request,
    response bytes not parsed) so the difference is what the runtime adds on the server side.
    Measured in alternating blocks so load from other processes hits both alike. Identity
    without delays runs predict on the event loop (Model.runs_inline); every real model hops
    to a model thread, so identity `--model-thread` is measured too: that is the figure for
    real models. The echo server tunes malloc like a model server does (keep_message_buffers),
    so large payloads do not page-fault in the baseline only.
(b) throughput at concurrency 16 of identity with a fixed per-batch cost, batching off
    (--max-batch-size 1) vs on (--max-batch-size 16): calls/s and the ratio.
(c) refusal latency when --max-inflight is full, vs a bare grpc.aio server that refuses
    everything, for callers arriving spaced out and all at once.
(d) Open Inference Protocol ModelInfer vs Predict on the same identity server, same payload,
    called the same way, in alternating blocks: p50/p99 and the ratio (goal: within 5 % at p50).
(e) mTLS on vs off: the same identity server (model thread) twice, plaintext and with a mesh CA
    certificate, called over a kept channel in alternating blocks (goal: ≤ 10 % added p50 per hop),
    and the cost of a new connection (channel + first call) with and without the TLS handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshserve.oip import grpc_predict_v2_pb2 as oip_pb2  # noqa: E402
from meshserve.servers.server import keep_message_buffers  # noqa: E402
from meshserve.v1 import prediction_pb2  # noqa: E402
from meshserve.wire import tensors  # noqa: E402
from tests.support import free_port  # noqa: E402

PREDICT = "/meshserve.v1.PredictionService/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
ECHO = "/bench.Echo/Echo"
ECHO_HOP = "/bench.Echo/EchoHop"
REFUSE = "/bench.Echo/Refuse"


# -- the baseline: a bare grpc.aio server that returns the request bytes ------------------


async def _echo_server(port: int) -> None:
    keep_message_buffers(16 << 20)  # as the identity server does with --max-message-bytes 16 MiB
    executor = ThreadPoolExecutor(max_workers=1)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        return b""

    async def echo_hop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # the one thread hop the runtime must make (inference off the event loop), alone
        return await asyncio.get_running_loop().run_in_executor(executor, bytes.__bytes__, request)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "EchoHop": grpc.unary_unary_rpc_method_handler(echo_hop),
            "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        },
    )
    limit = 16 * 1024 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- processes ----------------------------------------------------------------------------


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _start_identity(port: int, *flags: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "meshserve", "--log-level", "WARNING", "serve", "identity"]
    return _start([*argv, "--no-register", "--port", str(port), *flags])


def _wait_ready(port: int, proc: subprocess.Popen[bytes], health: bool) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                if health:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    return
            except (grpc.RpcError, grpc.FutureTimeoutError):
                pass
            time.sleep(0.05)
    raise TimeoutError(f"server on port {port} not ready")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- (a) round trip -----------------------------------------------------------------------


def _payload(nbytes: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, nbytes // 4)).astype(np.float32)
    request = prediction_pb2.PredictRequest()
    request.inputs["x"].CopyFrom(tensors.tensor_from(x))
    return request.SerializeToString()


async def _latencies(call: Callable[[], Awaitable[bytes]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append(time.perf_counter() - started)
    return out


async def round_trip(identity_port: int, hop_port: int, echo_port: int, quick: bool) -> None:
    print("(a) round trip, sequential calls, ms                        p50      p99")
    for label, nbytes, blocks, per_block in (("1 KB", 1024, 20, 100), ("600 KB", 600_000, 10, 30)):
        if quick:
            blocks = max(2, blocks // 5)
        body = _payload(nbytes)
        opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{identity_port}", options=opts) as ch_i, \
                grpc.aio.insecure_channel(f"127.0.0.1:{hop_port}", options=opts) as ch_t, \
                grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=opts) as ch_e:  # fmt: skip
            predict = ch_i.unary_unary(PREDICT)
            predict_hop = ch_t.unary_unary(PREDICT)
            echo = ch_e.unary_unary(ECHO)
            hop = ch_e.unary_unary(ECHO_HOP)
            reply = await predict(body, timeout=10)
            parsed = prediction_pb2.PredictResponse.FromString(reply)
            assert len(parsed.outputs["y"].content) == len(
                prediction_pb2.PredictRequest.FromString(body).inputs["x"].content
            )
            assert await echo(body, timeout=10) == body
            calls = {
                "echo": lambda b=body, f=echo: f(b, timeout=10),
                "hop": lambda b=body, f=hop: f(b, timeout=10),
                "identity": lambda b=body, f=predict: f(b, timeout=10),
                "identity_hop": lambda b=body, f=predict_hop: f(b, timeout=10),
            }
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():
                await _latencies(call, 20)  # warm
            for _ in range(blocks):  # alternate so background load hits all alike
                for name, call in calls.items():
                    samples[name] += await _latencies(call, per_block)
        b50, b99 = np.percentile(samples["echo"], [50, 99]) * 1e3
        h50, h99 = np.percentile(samples["hop"], [50, 99]) * 1e3
        i50, i99 = np.percentile(samples["identity"], [50, 99]) * 1e3
        t50, t99 = np.percentile(samples["identity_hop"], [50, 99]) * 1e3
        n = len(samples["echo"])
        print(f"  {label:>6}  bare grpc.aio echo (baseline)                 {b50:7.3f}  {b99:7.3f}"
              f"   (n={n} each)")  # fmt: skip
        print(f"  {label:>6}  bare echo + one executor hop                  {h50:7.3f}  {h99:7.3f}")
        print(f"  {label:>6}  identity Predict, predict inline on the loop  {i50:7.3f}  {i99:7.3f}")
        print(f"  {label:>6}  identity Predict, model thread (real models)  {t50:7.3f}  {t99:7.3f}")
        print(f"  {label:>6}  added over the bare echo, inline              {i50 - b50:7.3f}  {i99 - b99:7.3f}"
              f"   (p50 ratio {i50 / b50:.2f}x; goal ≤ 0.3 ms p50 added)")  # fmt: skip
        print(f"  {label:>6}  added over the bare echo, model thread        {t50 - b50:7.3f}  {t99 - b99:7.3f}"
              f"   (p50 ratio {t50 / b50:.2f}x)")  # fmt: skip
        print(f"  {label:>6}  … the bare echo's executor hop alone          {h50 - b50:7.3f}")


# -- (d) OIP ModelInfer vs Predict ------------------------------------------------------


def _oip_payload(nbytes: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, nbytes // 4)).astype(np.float32)
    request = oip_pb2.ModelInferRequest(model_name="identity")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


async def oip_vs_predict(identity_port: int, hop_port: int, quick: bool) -> None:
    print("(d) OIP ModelInfer vs Predict, same server and payload, ms  p50      p99")
    opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    for label, nbytes, blocks, per_block in (("1 KB", 1024, 20, 100), ("600 KB", 600_000, 10, 30)):
        if quick:
            blocks = max(2, blocks // 5)
        predict_body, oip_body = _payload(nbytes), _oip_payload(nbytes)
        for where, port in (("inline", identity_port), ("model thread", hop_port)):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
                predict = channel.unary_unary(PREDICT)
                infer = channel.unary_unary(MODEL_INFER)
                reply = oip_pb2.ModelInferResponse.FromString(await infer(oip_body, timeout=10))
                same = prediction_pb2.PredictResponse.FromString(await predict(predict_body, timeout=10))
                assert reply.raw_output_contents[0] == same.outputs["y"].content  # the same bytes back
                calls = {"predict": lambda f=predict, b=predict_body: f(b, timeout=10),
                         "oip": lambda f=infer, b=oip_body: f(b, timeout=10)}  # fmt: skip
                samples: dict[str, list[float]] = {name: [] for name in calls}
                for call in calls.values():
                    await _latencies(call, 20)  # warm
                for _ in range(blocks):
                    for name, call in calls.items():
                        samples[name] += await _latencies(call, per_block)
            p50, p99 = np.percentile(samples["predict"], [50, 99]) * 1e3
            o50, o99 = np.percentile(samples["oip"], [50, 99]) * 1e3
            print(f"  {label:>6}  Predict (baseline), {where:<12}             {p50:7.3f}  {p99:7.3f}"
                  f"   (n={len(samples['predict'])} each)")  # fmt: skip
            print(f"  {label:>6}  OIP ModelInfer, {where:<12}                 {o50:7.3f}  {o99:7.3f}"
                  f"   (p50 ratio {o50 / p50:.3f}; goal ≤ 1.05)")  # fmt: skip


# -- (e) mTLS on vs off -------------------------------------------------------------------


async def tls_on_off(quick: bool) -> None:
    import tempfile

    from meshserve.pki.authority import client_leaf, init_ca, issue, service_leaf
    from meshserve.pki.layout import PkiLayout

    layout = PkiLayout(Path(tempfile.mkdtemp(prefix="bench-pki-")))
    init_ca(layout)
    issue(layout, service_leaf("meshserve-identity"))
    issue(layout, client_leaf("cli"))
    tls_flags = ["--tls-ca", str(layout.ca_cert), "--tls-cert", str(layout.cert("meshserve-identity")),
                 "--tls-key", str(layout.key("meshserve-identity"))]  # fmt: skip
    credentials = grpc.ssl_channel_credentials(layout.ca_cert.read_bytes(), layout.key("cli").read_bytes(),
                                               layout.cert("cli").read_bytes())  # fmt: skip
    opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    tls_opts = [*opts, ("grpc.ssl_target_name_override", "meshserve-identity")]
    plain_port, tls_port = free_port(), free_port()
    common = ["--max-message-bytes", str(16 << 20), "--model-thread"]
    plain = _start_identity(plain_port, *common)
    secure = _start_identity(tls_port, *common, *tls_flags)

    def open_channel(secure_one: bool) -> grpc.aio.Channel:
        if secure_one:
            return grpc.aio.secure_channel(f"127.0.0.1:{tls_port}", credentials, options=tls_opts)
        return grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}", options=opts)

    print("(e) mTLS on vs off, identity Predict (model thread), ms      p50      p99")
    try:
        _wait_ready(plain_port, plain, health=True)
        deadline = time.monotonic() + 30
        while True:  # the TLS server: ready once a call over mTLS succeeds
            try:
                async with open_channel(True) as channel:
                    await channel.unary_unary(PREDICT)(_payload(64), timeout=2)
                break
            except grpc.aio.AioRpcError:
                if secure.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        for label, nbytes, blocks, per_block in (("1 KB", 1024, 20, 100), ("600 KB", 600_000, 10, 30)):
            if quick:
                blocks = max(2, blocks // 5)
            body = _payload(nbytes)
            async with open_channel(False) as ch_p, open_channel(True) as ch_s:
                predict_off, predict_on = ch_p.unary_unary(PREDICT), ch_s.unary_unary(PREDICT)
                calls = {"off": lambda f=predict_off, b=body: f(b, timeout=10),
                         "on": lambda f=predict_on, b=body: f(b, timeout=10)}  # fmt: skip
                samples: dict[str, list[float]] = {name: [] for name in calls}
                for call in calls.values():
                    await _latencies(call, 20)  # warm
                for _ in range(blocks):
                    for name, call in calls.items():
                        samples[name] += await _latencies(call, per_block)
            p50, p99 = np.percentile(samples["off"], [50, 99]) * 1e3
            s50, s99 = np.percentile(samples["on"], [50, 99]) * 1e3
            print(f"  {label:>6}  plaintext (baseline), kept channel             {p50:7.3f}  {p99:7.3f}"
                  f"   (n={len(samples['off'])} each)")  # fmt: skip
            print(f"  {label:>6}  mTLS, kept channel                            {s50:7.3f}  {s99:7.3f}"
                  f"   (p50 +{(s50 / p50 - 1) * 100:.1f} %; goal ≤ 10 %)")  # fmt: skip
        connects: dict[bool, list[float]] = {False: [], True: []}
        small = _payload(1024)
        for _ in range(10 if quick else 40):
            for secure_one in (False, True):
                started = time.perf_counter()
                async with open_channel(secure_one) as channel:
                    await channel.unary_unary(PREDICT)(small, timeout=10)
                connects[secure_one].append(time.perf_counter() - started)
        c50, c99 = np.percentile(connects[False], [50, 99]) * 1e3
        t50, t99 = np.percentile(connects[True], [50, 99]) * 1e3
        print(f"    1 KB  new connection + first call, plaintext      {c50:7.3f}  {c99:7.3f}"
              f"   (n={len(connects[False])} each)")  # fmt: skip
        print(f"    1 KB  new connection + first call, mTLS handshake {t50:7.3f}  {t99:7.3f}"
              f"   (+{t50 - c50:.2f} ms p50: once per connection; channels are kept)")  # fmt: skip
    finally:
        _stop(plain)
        _stop(secure)


# -- (b) throughput with batching off vs on -----------------------------------------------


async def _throughput(port: int, concurrency: int, seconds: float) -> tuple[float, float]:
    body = _payload(1024)
    done = 0
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = channel.unary_unary(PREDICT)
        await predict(body, timeout=10)
        stop_at = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                await predict(body, timeout=30)
                latencies.append(time.perf_counter() - started)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return done / elapsed, float(np.percentile(latencies, 50))


async def batching(cost_ms: float, quick: bool) -> None:
    seconds = 2.0 if quick else 5.0
    print(f"(b) throughput at concurrency 16, identity with --batch-cost-ms {cost_ms:g}")
    results = {}
    for label, flags in (
        ("batching off (--max-batch-size 1)        ", ["--max-batch-size", "1"]),
        ("batching on  (--max-batch-size 16)       ", ["--max-batch-size", "16"]),
        ("batching on  (16, --max-queue-delay-ms 5)", ["--max-batch-size", "16",
                                                       "--max-queue-delay-ms", "5"]),
    ):  # fmt: skip
        port = free_port()
        proc = _start_identity(port, "--batch-cost-ms", str(cost_ms), "--max-inflight", "64", *flags)
        try:
            _wait_ready(port, proc, health=True)
            rate, p50 = await _throughput(port, 16, seconds)
        finally:
            _stop(proc)
        results[label] = rate
        print(f"  {label}: {rate:8.1f} calls/s   p50 {p50 * 1e3:7.2f} ms")
    off, on, on_delay = results.values()
    print(f"  ratio on/off: {on / off:.1f}x (no queue delay), {on_delay / off:.1f}x (5 ms delay);"
          " ideal ≈ 16x (one fixed cost per batch of 16)")  # fmt: skip


# -- (c) refusals under overload ----------------------------------------------------------


async def _refusals(call: Callable[[], Awaitable[bytes]], callers: int, spacing_s: float) -> list[float]:
    async def one(i: int) -> float:
        await asyncio.sleep(i * spacing_s)
        started = time.perf_counter()
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            return time.perf_counter() - started
        raise AssertionError("admitted, expected a refusal")

    return list(await asyncio.gather(*(one(i) for i in range(callers))))


async def overload(echo_port: int, quick: bool) -> None:
    n = 4
    rounds = 3 if quick else 9
    port = free_port()
    proc = _start_identity(port, "--max-inflight", str(n), "--max-batch-size", str(n),
                           "--max-queue-delay-ms", "50", "--batch-cost-ms", "400")  # fmt: skip
    body = _payload(64)
    print(f"(c) refusals with --max-inflight {n} full; 3N={3 * n} more callers per round, ms"
          "                       p50      p99")  # fmt: skip
    try:
        _wait_ready(port, proc, health=True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch_i, \
                grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as ch_e:  # fmt: skip
            predict = ch_i.unary_unary(PREDICT)
            refuse = ch_e.unary_unary(REFUSE)
            await predict(body, timeout=10)
            for spacing, label in ((0.010, "arriving 10 ms apart"), (0.0, "all at once")):
                ours: list[float] = []
                bare: list[float] = []
                for _ in range(rounds):
                    held = [asyncio.ensure_future(predict(body, timeout=10)) for _ in range(n)]
                    await asyncio.sleep(0.05)  # held calls admitted (400 ms batch)
                    ours += await _refusals(lambda: predict(body, timeout=10), 3 * n, spacing)
                    await asyncio.gather(*held)
                    bare += await _refusals(lambda: refuse(body, timeout=10), 3 * n, spacing)
                o50, o99 = np.percentile(ours, [50, 99]) * 1e3
                b50, b99 = np.percentile(bare, [50, 99]) * 1e3
                print(f"  {label:>20}: bare grpc.aio refuser (baseline) {b50:7.2f}  {b99:7.2f}"
                      f"   (n={len(bare)})")  # fmt: skip
                print(f"  {label:>20}: identity over its limit          {o50:7.2f}  {o99:7.2f}"
                      f"   (goal p99 < 5 ms)")  # fmt: skip
    finally:
        _stop(proc)


async def main_async(args: argparse.Namespace) -> None:
    identity_port, hop_port, echo_port = free_port(), free_port(), free_port()
    identity = _start_identity(identity_port, "--max-message-bytes", str(16 << 20))
    identity_hop = _start_identity(hop_port, "--max-message-bytes", str(16 << 20), "--model-thread")
    echo = _start([sys.executable, str(Path(__file__).resolve()), "--echo-server", str(echo_port)])
    try:
        _wait_ready(identity_port, identity, health=True)
        _wait_ready(hop_port, identity_hop, health=True)
        _wait_ready(echo_port, echo, health=False)
        if "a" in args.only:
            await round_trip(identity_port, hop_port, echo_port, args.quick)
        if "d" in args.only:
            await oip_vs_predict(identity_port, hop_port, args.quick)
        _stop(identity)
        _stop(identity_hop)
        if "c" in args.only:
            await overload(echo_port, args.quick)
    finally:
        _stop(identity)
        _stop(identity_hop)
        _stop(echo)
    if "b" in args.only:
        await batching(args.batch_cost_ms, args.quick)
    if "e" in args.only:
        await tls_on_off(args.quick)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--only", default="abcde", help="which parts to run, e.g. a (default: abcde)")
    parser.add_argument("--batch-cost-ms", type=float, default=20.0, help="fixed cost per model call")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return 0
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
