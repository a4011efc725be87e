"""Issue 8, fault injection: simulated backends that die, stall, fail, start slowly or restart, with
requests going through a real gateway. Every failure a client sees must be a proper error, and only
requests that were on the failing backend at the time may see one."""

from __future__ import annotations

import threading
import time

import httpx

from tests.resilience.load import Load, Result
from tests.resilience.support import is_error_event, is_gateway_error_body, iter_sse, metric_sum
from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim, wait_until


def stream_body(model: str, max_tokens: int = 200) -> dict[str, object]:
    return {"model": model, "prompt": "roll on", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}


def upstream_errors(gw: GatewayServer, backend: str, kind: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    return metric_sum(text, "switchyard_upstream_errors_total", backend=backend, kind=kind)


def routable(gw: GatewayServer, url: str) -> bool:
    return any(backend.url == url and backend.routable for backend in gw.registry.backends)


def test_backend_killed_mid_stream_ends_with_error_event_then_done() -> None:
    with (
        running_sims(sim("victim", "--decode-ms-per-token", "20")) as (upstream,),
        gateway(upstream.url) as gw,
        httpx.stream("POST", gw.url + "/v1/completions", json=stream_body("victim"), timeout=10) as response,
    ):
        assert response.status_code == 200
        events = iter_sse(response)
        before = [next(events) for _ in range(3)]
        killed = time.monotonic()
        upstream.kill()
        after = list(events)  # httpx raises here if the stream is cut without its chunked terminator
        ended = time.monotonic()
    assert all(not is_error_event(payload) for payload in before)
    assert after[-1] == "[DONE]", after[-3:]
    assert is_error_event(after[-2]), after[-3:]
    assert all(not is_error_event(payload) for payload in after[:-2])
    assert ended - killed < 1.0, f"the error event came {ended - killed:.2f} s after the kill"


def test_backend_killed_during_non_stream_request_answers_502() -> None:
    with (
        running_sims(sim("victim", "--decode-ms-per-token", "20")) as (upstream,),
        gateway(upstream.url) as gw,
        httpx.Client(timeout=10) as client,
    ):
        body = {"model": "victim", "prompt": "x", "max_tokens": 200, "ignore_eos": True}
        request = client.build_request("POST", gw.url + "/v1/completions", json=body)
        response_box: list[httpx.Response] = []

        def send() -> None:
            response_box.append(client.send(request))

        thread = threading.Thread(target=send)
        thread.start()
        wait_until(lambda: upstream.metric("vllm:num_requests_running") == 1, 5, what="request on the engine")
        killed = time.monotonic()
        upstream.kill()
        thread.join(5)
        ended = time.monotonic()
    assert response_box, "no answer within 5 s of the kill"
    response = response_box[0]
    assert response.status_code == 502, response.text
    assert is_gateway_error_body(response.text)
    assert ended - killed < 1.0


def test_stalled_backend_gets_error_event_within_the_idle_timeout() -> None:
    idle = 0.5
    with (
        running_sims(sim("stuck", "--stall-after-tokens", "3")) as (upstream,),
        gateway(upstream.url, timeouts={"idle": idle}) as gw,
        httpx.stream("POST", gw.url + "/v1/completions", json=stream_body("stuck"), timeout=10) as response,
    ):
        arrivals: list[tuple[float, str]] = [(time.monotonic(), payload) for payload in iter_sse(response)]
        # the stalled upstream request is dropped, not left pinned on the engine
        wait_until(lambda: upstream.metric("vllm:num_requests_running") == 0, 2, what="stalled request dropped")
    payloads = [payload for _, payload in arrivals]
    assert payloads[-1] == "[DONE]"
    assert is_error_event(payloads[-2])
    content = arrivals[:-2]
    assert len(content) == 3
    silence = arrivals[-2][0] - content[-1][0]
    assert idle * 0.8 <= silence <= idle + 1.0, f"error event after {silence:.2f} s of silence (idle {idle} s)"


def test_5xx_burst_is_retried_and_the_failing_backend_ejected() -> None:
    good, bad = sim("burst"), sim("burst", "--fail-rate", "1", "--fail-status", "503")
    requests = 200
    with (
        running_sims(good, bad),
        gateway(good.url, bad.url, routing={"policy": "round_robin"}) as gw,
        httpx.Client(timeout=10) as client,
    ):
        statuses: list[int] = []
        halfway = 0.0
        for number in range(requests):
            body = {"model": "burst", "prompt": f"wagon {number}", "max_tokens": 2}
            statuses.append(client.post(gw.url + "/v1/completions", json=body).status_code)
            if number == requests // 2 - 1:
                halfway = upstream_errors(gw, bad.url, "status")
        total = upstream_errors(gw, bad.url, "status")
        retries = metric_sum(httpx.get(gw.url + "/metrics").text, "switchyard_retries_total")
        served_by_good = good.metric("vllm:request_success_total")
    failed = [status for status in statuses if status != 200]
    assert failed == [], f"clients saw {len(failed)} failures: {sorted(set(failed))}"
    assert served_by_good == requests
    # Round robin alone would send half of them (100) to the failing backend; ejected, it gets a few
    # before each ejection (3 in a row by default) and none while ejected.
    assert 1 <= total <= 12, f"the failing backend received {total:g} of {requests} requests"
    assert total - halfway <= 6, f"it still received {total - halfway:g} requests in the second half"
    assert retries == total  # each 503 was retried once, on the other backend
    assert retries <= 0.2 * requests + 10  # within the default budget: 20% of requests plus its initial reserve


def test_failing_fleet_is_not_hammered_by_retries() -> None:
    fleet = [sim("down", "--fail-rate", "1", "--fail-status", "503") for _ in range(3)]
    requests = 100
    with running_sims(*fleet), gateway(*(s.url for s in fleet)) as gw, httpx.Client(timeout=10) as client:
        answers = [
            client.post(gw.url + "/v1/completions", json={"model": "down", "prompt": f"{n}", "max_tokens": 2})
            for n in range(requests)
        ]
        attempts = sum(upstream_errors(gw, s.url, "status") for s in fleet)
    assert {answer.status_code for answer in answers} == {503}
    assert all(is_gateway_error_body(answer.text) for answer in answers)
    # at most 2 retries per request, and within the budget: 20% of requests plus its initial reserve of 10
    assert attempts <= requests + 0.2 * requests + 10, f"{attempts:g} upstream attempts for {requests} requests"


def test_slow_starting_backend_gets_requests_only_once_healthy() -> None:
    ready, slow = sim("warm"), sim("warm", "--slow-start", "5")
    ready.start()
    try:
        slow.start(wait_healthy=False)
        with gateway(ready.url, slow.url, routing={"policy": "round_robin"}) as gw, httpx.Client(timeout=10) as c:
            body = {"model": "warm", "prompt": "x", "max_tokens": 2}
            while_starting = 0
            while True:
                assert c.post(gw.url + "/v1/completions", json=body).status_code == 200
                if c.get(slow.url + "/health").status_code == 200:
                    break
                # still starting after that request: whatever it served so far, it served while starting
                assert slow.metric("vllm:request_success_total") == 0, "a backend still starting got requests"
                while_starting += 1
            assert while_starting >= 5, "too few requests went out while the backend was starting"
            deadline = time.monotonic() + 10
            while slow.metric("vllm:request_success_total") == 0:
                assert time.monotonic() < deadline, "the backend got no requests 10 s after turning healthy"
                assert c.post(gw.url + "/v1/completions", json=body).status_code == 200
    finally:
        slow.stop()
        ready.stop()


def improper(results: list[Result]) -> list[Result]:
    return [result for result in results if result.verdict == "improper"]


def test_rolling_restart_under_steady_load_fails_no_request() -> None:
    fleet = [sim("roll") for _ in range(3)]
    try:
        with running_sims(*fleet), gateway(*(s.url for s in fleet)) as gw, Load(gw.url, "roll", workers=4) as load:
            wait_until(lambda: load.count() >= 50, 20, what="steady load")
            for index, old in enumerate(fleet):
                old.stop()  # SIGTERM: the simulator finishes its in-flight requests and exits
                assert old.process is not None
                assert old.process.returncode is not None
                new = SimProcess(old.args, port=old.port)
                fleet[index] = new
                new.start()
                wait_until(lambda new=new: routable(gw, new.url), 15, what=f"restarted backend {index} in rotation")
                served = load.count()
                wait_until(lambda served=served: load.count() >= served + 30, 20, what="load after the restart")
            load.stop()
            results = load.snapshot()
            for restarted in fleet:  # every restarted backend took part again
                assert restarted.metric("vllm:request_success_total") > 0
    finally:
        for process in fleet:  # the restarted ones are not known to running_sims
            process.stop()
    failures = [result for result in results if result.verdict != "ok"]
    assert len(results) >= 150
    assert failures == [], f"{len(failures)} of {len(results)} requests failed, e.g. {failures[:3]}"


def test_kill_9_under_load_fails_only_the_victims_in_flight_requests_promptly() -> None:
    """Without mid-stream failover (test_failover_load.py has it on): the victim's streams end in-band."""
    fleet = [sim("load", "--decode-ms-per-token", "10") for _ in range(3)]
    victim = fleet[1]
    with (
        running_sims(*fleet),
        gateway(*(s.url for s in fleet), failover={"enabled": False}) as gw,
        Load(gw.url, "load", workers=9, max_tokens=25, stream_share=0.8) as load,
    ):
        (victim_backend,) = [b for b in gw.registry.backends if b.url == victim.url]
        wait_until(lambda: load.count() >= 30 and victim_backend.inflight >= 2, 20, what="load on the victim")
        looked = time.monotonic()
        inflight_at_kill = victim_backend.inflight
        victim.kill()
        killed = time.monotonic()
        served = load.count()
        wait_until(lambda: load.count() >= served + 60, 20, what="load after the kill")
        load.stop()
    results = load.snapshot()
    bad = improper(results)
    assert bad == [], f"{len(bad)} requests failed without a proper error, e.g. {bad[:3]}"
    failures = [result for result in results if result.verdict != "ok"]
    raced = sum(looked <= result.started <= killed for result in results)  # began between the look and the kill
    assert failures, "the victim's in-flight streams should have ended with an error event"
    assert len(failures) <= inflight_at_kill + raced, (
        f"{len(failures)} failures, but only {inflight_at_kill} (+{raced}) requests were on the victim"
    )
    for failure in failures:
        assert failure.started <= killed, f"a request started after the kill failed: {failure}"
        assert failure.ended <= killed + 1.0, f"a failure came {failure.ended - killed:.2f} s after the kill"
