"""The benchmark harness: it runs end to end on tiny N and writes well-formed results.

These assert structure, never speed: the numbers of a run on a shared CI box mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, select

from bench import stack
from bench.deliveries import event_mix, signed_deliveries
from bench.profile import INGEST_STEPS, attribute
from bench.purge import sign_test, summarize
from bench.run import spread
from ingest.verify import Verifier
from shared.catalog import HANDLED_TYPES
from shared.db import make_sessionmaker
from shared.models import EventStatus, WebhookEvent

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_module("bench.run", *args, env=env)


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the repository, as `make bench*` runs it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


class TestBenchQuickRun:
    def test_quick_run_writes_results_with_ratios_against_same_run_floors(
        self, tmp_path: Path
    ) -> None:
        done = run_bench(
            "--quick",
            "--json",
            "--duration=1",
            "--rate-duration=1",
            "--rates=100",
            "--events=40",
            "--workers=1",
            f"--out={tmp_path}",
        )
        assert done.returncode == 0, done.stderr[-4000:]
        printed = json.loads(done.stdout)
        stamped = [p for p in tmp_path.glob("*.json") if p.name != "latest.json"]
        assert len(stamped) == 1
        assert json.loads((tmp_path / "latest.json").read_text()) == printed
        assert json.loads(stamped[0].read_text()) == printed

        assert printed["machine"]["nproc"] >= 1
        assert printed["versions"]["gunicorn"] and printed["versions"]["postgresql"]
        workers = str(stack.GUNICORN_WORKERS)
        assert printed["settings"]["gunicorn_flags"][:2] == ["-w", workers]
        best = printed["ingest"]["best"]
        for key in ("ingest_acked_per_s", "floor_acked_per_s", "ratio"):
            assert set(best[key]) == {"median", "min", "max", "n"}
            assert is_number(best[key]["median"]) and best[key]["median"] > 0
        fixed = printed["ingest"]["fixed_rate"]["100"]
        assert is_number(fixed["ingest"]["p99_ms"]["median"])
        assert is_number(fixed["floor"]["p50_ms"]["median"])
        e2e = printed["e2e"]["1"]
        assert e2e["all_complete"] is True
        assert is_number(e2e["ratio"]["median"]) and e2e["ratio"]["median"] > 0
        # PostgreSQL shares the cores with what is measured: its CPU is reported beside it.
        saturation = next(iter(printed["ingest"]["saturation"].values()))
        assert saturation["ingest_postgres_cpu_ms_per_request"]["median"] > 0
        # The durable floor records what it acknowledges, and PostgreSQL works for it.
        assert saturation["durable_floor_acked_per_s"]["median"] > 0
        assert saturation["durable_floor_recorded_equals_acked"] is True
        assert saturation["durable_floor_postgres_cpu_ms_per_request"]["median"] > 0
        assert is_number(saturation["ratio_to_durable_floor"]["median"])
        assert e2e["product_postgres_cpu_ms_per_event"]["median"] > 0
        # The database floor replays the drain's statements: the same events, all finished.
        assert e2e["database_floor_events_per_s"]["median"] > 0
        assert e2e["runs"]["database"][0]["events"] == 40
        assert is_number(e2e["ratio_to_database_floor"]["median"])
        # From acknowledgement to applied, with ingest and workers running.
        applied = printed["applied"]["100"]
        assert applied["all_applied"] is True
        assert 0 < applied["p50_ms"]["median"] <= applied["p99_ms"]["median"]
        statuses = e2e["runs"]["product"][0]["statuses"]
        assert sum(v for k, v in statuses.items() if k in ("processed", "ignored", "dead")) == 40
        assert set(printed["peak_rss_mib"]) >= {"ingest_worker", "celery_main", "celery_pool_child"}
        assert all(v > 0 for v in printed["peak_rss_mib"].values())
        assert set(printed["targets"]) == {
            "ingest_acked_per_s",
            "ingest_ratio_to_floor",
            "p99_ms_at_500_per_s",
            "e2e_ratio_to_floor_2_workers",
        }
        assert "[bench" in done.stderr  # progress lines while it runs

    def test_says_how_to_install_wrk_when_it_is_missing(self, tmp_path: Path) -> None:
        done = run_bench("--quick", f"--out={tmp_path}", env={"PATH": str(tmp_path)})
        assert done.returncode == 2
        assert "apt-get install -y wrk" in done.stderr
        assert not list(tmp_path.glob("*.json"))


class TestDeliveries:
    def test_deliveries_are_distinct_and_verify_with_the_ingest_verifier(self) -> None:
        from bench.deliveries import new_secret

        secret = new_secret()
        deliveries = list(signed_deliveries(120, secret, run="t"))
        assert len({d.webhook_id for d in deliveries}) == 120
        assert len({d.body for d in deliveries}) == 120
        verifier = Verifier([secret])
        for d in deliveries:
            assert verifier.verify(d.body, d.headers).webhook_id == d.webhook_id
            assert json.loads(d.body)["type"] == d.event_type

    def test_event_mix_covers_every_handled_type(self) -> None:
        assert set(HANDLED_TYPES) <= set(event_mix(400))


class TestProfileAttribution:
    def test_a_sample_is_charged_to_the_product_step_not_the_framework_around_it(self) -> None:
        raw = (
            "run (gunicorn/arbiter.py:1);receive (ingest/webhooks.py:49);"
            "_insert_psycopg (ingest/recording.py:110);Cursor.execute (psycopg/cursor.py:113) 3\n"
            "run (gunicorn/arbiter.py:1);SyncWorker.handle (gunicorn/workers/sync.py:141) 1\n"
        )
        shares = attribute(raw, INGEST_STEPS)
        assert shares["record INSERT: execute (psycopg, round trip)"] == 75.0
        assert shares["gunicorn: accept, parse, write"] == 25.0
        assert shares["samples"] == 4


class TestSpread:
    def test_reports_median_min_max_and_ignores_nan(self) -> None:
        assert spread([3.0, 1.0, float("nan"), 2.0]) == {
            "median": 2.0,
            "min": 1.0,
            "max": 3.0,
            "n": 3,
        }


class TestConsoleBench:
    def test_times_every_console_page_on_a_small_inbox(self, tmp_path: Path) -> None:
        out = tmp_path / "console.json"
        argv = ["--events", "3000", "--repeat", "1", "--out", str(out)]
        result = run_module("bench.console", *argv)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        pages = json.loads(out.read_text())["pages"]
        assert len(pages) == 20
        assert all(is_number(page["median_ms"]) for page in pages)
        assert {page["page"]: page["status"] for page in pages}["Search an unknown id"] == 404


class TestPurgeBench:
    """bench/purge.py on a tiny table: it purges everything seeded and reports each window."""

    @pytest.mark.parametrize("bodies", ["days", "rows"])
    def test_a_tiny_run_purges_every_seeded_body_and_writes_its_results(
        self, tmp_path: Path, bodies: str
    ) -> None:
        out = tmp_path / "purge.json"
        args = ["--rows", "3000", "--days", "3", "--rate", "20", "--window", "1"]
        args += ["--baseline", "3", "--bodies", bodies, "--pause", "0", "--out", str(out)]
        done = run_module("bench.purge", *args)
        assert done.returncode == 0, done.stderr
        report = json.loads(out.read_text())
        assert report["purge"]["events"] == 3000 and report["purge"]["bytes"] > 3000 * 1000
        windows = report["windows"]
        kinds = [w["kind"] for w in windows]
        assert (kinds[0], kinds[-1]) == ("before", "after") and "during" in kinds
        assert all(w["statuses"] == {"202": 20} for w in windows)
        assert sum(w.get("purged_events", 0) for w in windows) == 3000
        if bodies == "days":
            # A day a purge window, oldest first: 1,000 events each.
            during = [w for w in windows if w["kind"] == "during"]
            assert [(w["purged_days"], w["purged_events"]) for w in during] == [(1, 1000)] * 3
        assert report["seeded_bodies_left_after"] == 0
        assert set(report["verdict"]) == {"p50", "p99"}
        assert is_number(report["erasure_of_one_customer_with_20_events"]["real_s"])
        assert "erase-customer" in done.stdout and "without a purge" in done.stdout


def latency(p99: float) -> dict[str, float]:
    return {"p50": 1.0, "p90": 2.0, "p99": p99}


def purge_windows(during_p99: list[float], quiet_p99: list[float]) -> list[dict[str, object]]:
    """Windows as bench/purge.py records them: 3 stopped ones, then purge windows (p99 from
    `during_p99`) each followed by a stopped one, then 3 stopped; stopped p99s cycle through
    `quiet_p99`."""
    quiet = iter(quiet_p99 * 100)

    def one(kind: str, p99: float) -> dict[str, object]:
        return {"kind": kind, "checkpoints": 0, "autovacuums": 0, "latency_ms": latency(p99)}

    windows = [one("before", next(quiet)) for _ in range(3)]
    for p99 in during_p99:
        windows += [one("during", p99), one("between", next(quiet))]
    return windows + [one("after", next(quiet)) for _ in range(3)]


class TestPurgeVerdict:
    """The purge bench's verdict: within noise needs both the noise windows' range and a sign
    test, so that a small shift nearly every purge window shows is not called noise."""

    def test_sign_test_is_the_exact_two_sided_binomial(self) -> None:
        assert sign_test(5, 10) == 1.0 and sign_test(0, 0) == 1.0
        assert math.isclose(sign_test(10, 10), 2 / 2**10)
        assert math.isclose(sign_test(0, 10), 2 / 2**10)
        assert math.isclose(sign_test(8, 10), 2 * (45 + 10 + 1) / 2**10)

    def test_a_shift_inside_the_range_but_in_every_window_is_outside_the_noise(self) -> None:
        # Stopped windows swing by +-5 ms; every purge window sits 0.5 ms above its neighbours.
        quiet = [10.0, 15.0, 5.0, 10.0]
        windows = purge_windows([0.0] * 30, quiet)
        for i, w in enumerate(windows):
            if w["kind"] == "during":
                left, right = windows[i - 1]["latency_ms"], windows[i + 1]["latency_ms"]
                w["latency_ms"] = latency((left["p99"] + right["p99"]) / 2 + 0.5)
        verdict = summarize(windows)["verdict"]["p99"]
        noise = verdict["noise_ms"]
        assert noise["min"] < 0.5 < noise["max"]  # the range alone would call it noise
        assert verdict["purge_windows_above_neighbours"] == [30, 30]
        assert verdict["within_noise"] is False

    def test_purge_windows_like_their_neighbours_are_within_noise(self) -> None:
        quiet = [10.0, 15.0, 5.0, 10.0]
        windows = purge_windows([10.0, 12.0, 8.0, 10.0] * 5, quiet)
        verdict = summarize(windows)["verdict"]["p99"]
        above, n = verdict["purge_windows_above_neighbours"]
        assert 0 < above < n
        assert verdict["sign_test_p"] >= 0.05 and verdict["within_noise"] is True


class TestPurgeCompareBench:
    """bench/purge_compare.py on a tiny table: each variant's windows sit between stopped ones,
    and each does what it says (the purge purges, the WAL writer writes WAL)."""

    def test_a_tiny_run_pairs_each_variant_with_stopped_windows(self, tmp_path: Path) -> None:
        out = tmp_path / "compare.json"
        args = ["--rows", "12000", "--rate", "20", "--window", "1", "--reps", "1"]
        args += ["--variants", "none,purge:500:0.25,cpu,wal", "--out", str(out)]
        done = run_module("bench.purge_compare", *args)
        assert done.returncode == 0, done.stderr
        report = json.loads(out.read_text())
        kinds = [w["kind"] for w in report["windows"]]
        assert kinds[::2] == ["stopped"] * 5
        assert sorted(kinds[1::2]) == ["cpu", "none", "purge:500:0.25", "wal"]
        by_kind = {w["kind"]: w for w in report["windows"]}
        assert by_kind["purge:500:0.25"]["purged_events"] > 0
        assert by_kind["wal"]["wal_bytes"] > 2 * by_kind["none"]["wal_bytes"]
        assert by_kind["cpu"]["runs"] > 0
        assert set(report["minus_neighbours_ms"]) == {"none", "purge:500:0.25", "cpu", "wal"}
        # One window per variant: above its neighbours or not, and a sign test that can
        # tell nothing from one coin flip.
        windows = report["windows"]
        i = kinds.index("none")
        beside = (windows[i - 1]["latency_ms"]["p99"] + windows[i + 1]["latency_ms"]["p99"]) / 2
        p99 = report["minus_neighbours_ms"]["none"]["p99"]
        assert p99["n"] == 1 and p99["sign_test_p"] == 1.0
        assert p99["above"] == int(windows[i]["latency_ms"]["p99"] > beside)
        assert all(w["statuses"] == {"202": 20} for w in report["windows"])
        assert "VARIANT" in done.stdout


class TestCeleryBatchesApply:
    """bench/batches_apply.py, the body of the celery-batches task of `make bench-batches`.

    Runs in process on real PostgreSQL, and needs neither the `bench` extra nor a worker:
    celery-batches only decides which messages make a batch; this is what a batch does.
    """

    def recorded(self, engine: Engine, n: int) -> list[str]:
        from bench.run import record

        deliveries = list(signed_deliveries(n, "whsec_" + "A" * 32, run="cb"))
        record(SimpleNamespace(engine=engine), deliveries)  # type: ignore[arg-type]
        return [d.webhook_id for d in deliveries]

    def states(self, engine: Engine) -> dict[str, tuple[str, int, str | None]]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    WebhookEvent.webhook_id,
                    WebhookEvent.status,
                    WebhookEvent.attempts,
                    WebhookEvent.type,
                )
            )
            return {wid: (str(status), attempts, type_) for wid, status, attempts, type_ in rows}

    def test_applies_exactly_the_events_its_messages_name_each_in_one_attempt(
        self, clean_db: Engine
    ) -> None:
        from bench.batches_apply import apply_messages
        from workers.handlers import ROUTES
        from workers.tasks import drain

        ids = self.recorded(clean_db, 12)
        named = ids[:10]
        finished = apply_messages(drain, make_sessionmaker(clean_db), named, 300)

        assert finished == 10
        states = self.states(clean_db)
        for webhook_id in named:
            status, attempts, event_type = states[webhook_id]
            expected = "processed" if event_type in ROUTES else "ignored"
            assert (status, attempts) == (expected, 1), webhook_id
        for webhook_id in ids[10:]:
            assert states[webhook_id][:2] == (str(EventStatus.PENDING), 0)

    def test_a_batch_delivered_again_claims_nothing_and_counts_no_attempt(
        self, clean_db: Engine
    ) -> None:
        from bench.batches_apply import apply_messages
        from workers.tasks import drain

        ids = self.recorded(clean_db, 5)
        factory = make_sessionmaker(clean_db)
        assert apply_messages(drain, factory, ids, 300) == 5
        assert apply_messages(drain, factory, ids, 300) == 0
        assert {attempts for _, attempts, _ in self.states(clean_db).values()} == {1}
