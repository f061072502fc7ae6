"""The work loop driven in process: a fake model, in-process status rounds, no torchrun."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nougat_dist.config import Config
from nougat_dist.errors import SetupError
from nougat_dist.inputs.sources import discover
from nougat_dist.ocr.render import EncoderInput
from nougat_dist.sched.plan import Plan, decide_plan, unit_weights
from nougat_dist.sched.queue import ClaimQueue, RankStatus
from nougat_dist.sched.steal import plan_steals
from nougat_dist.store import manifest
from nougat_dist.store.chunks import PAGES_DIR, ChunkWriter, chunk_units
from nougat_dist.worker import Worker
from testing import faults
from testing.fake_model import FakeModel


class OneRankRounds:
    """StatusRounds' contract (post, ready, collect, rounds) for a job of one rank."""

    def __init__(self) -> None:
        self.rounds = 0
        self.history: list[list[RankStatus]] = []
        self._posted: list[int] | None = None

    def post(self, vector: list[int]) -> None:
        assert self._posted is None, "posted twice without collecting"
        self._posted = list(vector)

    def ready(self) -> bool:
        return True

    def peers(self, rows: list[list[int]]) -> list[list[int]]:
        return rows

    def collect(self) -> list[list[int]]:
        assert self._posted is not None, "collected without posting"
        rows = self.peers([self._posted])
        self._posted = None
        self.rounds += 1
        self.history.append([RankStatus.decode(r) for r in rows])
        return rows


class SlowPeerRounds(OneRankRounds):
    """Rounds of a two-rank job whose rank 1 is simulated here: it processes one unit per round
    at a tenth of a page per second, and applies the same steals from the same gathered rows."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.peer = ClaimQueue(plan.queues, 1, plan.units, [d.doc_id for d in plan.docs],
                               unit_weights(plan))
        self.done = 0
        self.claimed_units: list[str] = []

    def peers(self, rows: list[list[int]]) -> list[list[int]]:
        rows = rows + [self.peer.status(self.done, 100, False, 1, {}).encode()]
        self.peer.apply_steals(plan_steals(self.peer.queues, rows, self.peer.weights))
        claim = self.peer.claim()
        if claim is not None:
            self.claimed_units.append(claim.unit_key)
            for page in claim.pages:
                self.peer.finish(page)
            self.done += claim.n_pages
        return rows


class NoStop:
    requested = False


def make_plan(pdfs: list[Path], out: Path, world_size: int, unit_pages: int) -> Plan:
    out.mkdir(parents=True, exist_ok=True)
    sources = discover([str(p) for p in pdfs])
    entries = manifest.write(out, [e for _, e in manifest.build_entries(sources, 0, 1)])
    return decide_plan(out, entries, unit_pages, world_size)


def make_worker(plan: Plan, out: Path, rank: int, rounds: object, *, delay: float = 0.0,
                stop: object = NoStop(), num_workers: int = 0, batch_size: int = 2,
                commit_pages: int = 1, model: object | None = None,
                render_timeout: float = 20, batching: str = "length_aware") -> Worker:
    cfg = Config(input=["x"], output=str(out), num_workers=num_workers, batch_size=batch_size,
                 commit_pages=commit_pages, render_timeout=render_timeout,
                 batching=batching)
    writer = ChunkWriter(out, rank, commit_pages, commit_seconds=3600)
    m = model if model is not None else FakeModel(f"delay={delay}", rank)
    return Worker(cfg, plan, rank=rank, world_size=len(plan.queues), load=lambda: m,
                  rounds=rounds, writer=writer, stop=stop,
                  encoder_input=EncoderInput([448, 224], False), batch_size=batch_size,
                  model_id="fake", dtype_name="none")


def committed(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / PAGES_DIR).glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def all_pages(plan: Plan) -> set[tuple[str, int]]:
    return {(plan.docs[u.doc].doc_id, p) for u in plan.units for p in u.pages()}


def check_chunks_hold_whole_units(out: Path) -> None:
    """Each chunk's rows are exactly the pages of the units its footer names, each unit's rows
    together and in page order."""
    for path in (out / PAGES_DIR).glob("*.parquet"):
        rows = [(r["doc_id"], r["page"]) for r in pq.read_table(path).to_pylist()]
        expected = []
        for key in chunk_units(path):
            doc_id, first, last = manifest.parse_unit_key(key)
            expected.extend((doc_id, p) for p in range(first, last + 1))
        assert rows == expected, path


def test_one_rank_commits_every_page_once_in_whole_units(sample_pdfs, tmp_path):
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
    w = make_worker(plan, out, 0, OneRankRounds())
    assert w.run() is False
    rows = committed(out)
    assert sorted((r["doc_id"], r["page"]) for r in rows) == sorted(all_pages(plan))
    assert {r["status"] for r in rows} == {"ok"}
    check_chunks_hold_whole_units(out)
    assert w.stats.pages == len(rows) and w.stats.units == len(plan.units)
    final = w.rounds.history[-1][0]
    assert final.finished == 1 and final.done_pages == len(rows) and final.inflight == 0


def test_fast_rank_steals_from_slow_rank_and_nothing_is_lost(sample_pdfs, tmp_path):
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=2, unit_pages=1)
    assert len(plan.queues[1]) >= 3
    rounds = SlowPeerRounds(plan)
    w = make_worker(plan, out, 0, rounds, batch_size=1)
    assert w.run() is False
    assert w.stats.units_stolen > 0
    # both views of the queues agree after every steal, and every unit was claimed once
    assert w.queue.queues == rounds.peer.queues
    mine = {r["doc_id"] + f":{r['page']}-{r['page']}" for r in committed(out)}
    assert len(mine) == w.stats.units
    assert mine.isdisjoint(rounds.claimed_units)
    assert len(mine) + len(rounds.claimed_units) == len(plan.units)
    assert rounds.history[-1][0].finished and rounds.history[-1][1].finished


class StopAfter:
    """A stop request that arrives once `worker` has processed `pages` pages."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.worker: Worker | None = None

    @property
    def requested(self) -> bool:
        return self.worker is not None and self.worker.stats.pages >= self.pages


def test_stop_request_commits_whole_units_then_stops(sample_pdfs, tmp_path):
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
    stop = StopAfter(3)
    w = make_worker(plan, out, 0, OneRankRounds(), stop=stop, commit_pages=1000)
    stop.worker = w
    assert w.run() is True
    rows = committed(out)
    assert 0 < len(rows) < len(all_pages(plan))  # committed what was done, then stopped
    check_chunks_hold_whole_units(out)
    assert w.rounds.history[-1][0].stop == 1


def test_render_crash_costs_only_the_guilty_page(sample_pdfs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
    guilty = sample_pdfs[0].name
    monkeypatch.setenv(faults.ENV, faults.value(f"render-crash:{guilty}:2"))
    w = make_worker(plan, out, 0, OneRankRounds(), num_workers=1)
    assert w.run() is False
    rows = committed(out)
    assert sorted((r["doc_id"], r["page"]) for r in rows) == sorted(all_pages(plan))
    bad = [r for r in rows if r["status"] != "ok"]
    assert [(Path(r["source"]).name, r["page"], r["status"]) for r in bad] == [
        (guilty, 2, "render_error")]
    assert "crashed" in bad[0]["error"]
    assert w.stats.render_recoveries == 1
    check_chunks_hold_whole_units(out)


# --- a render worker dies or hangs wherever the loop is -------------------------------------------

def _exited(pid: int) -> bool:
    """Whether child process `pid` has ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class FaultAt:
    """Holds the render fault's page at its gate (faults.GATE_ENV) until the loop first reaches
    `point`, then opens the gate there and keeps the loop at that point until the render worker
    has died: the death lands there and nowhere else."""

    def __init__(self, gate: Path, point: str) -> None:
        self.gate, self.point = gate, point
        self.landed: str | None = None
        self.pid: int | None = None

    def at(self, point: str) -> None:
        if point != self.point or self.landed is not None:
            return
        self.gate.touch()
        pid_file = Path(f"{self.gate}.pid")
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and _exited(int(pid_file.read_text()))):
            assert time.monotonic() < deadline, f"the render fault never fired at {point}"
            time.sleep(0.02)
        self.pid = int(pid_file.read_text())
        self.landed = point


class HookedModel(FakeModel):
    def __init__(self, delay: float, fault: FaultAt) -> None:
        super().__init__(f"delay={delay}", 0)
        self.fault = fault

    def inference(self, image_tensors, early_stopping=True):
        self.fault.at("model step")
        return super().inference(image_tensors, early_stopping)


class HookedRounds(OneRankRounds):
    def __init__(self, fault: FaultAt) -> None:
        super().__init__()
        self.fault = fault

    def collect(self):
        self.fault.at("status round")
        return super().collect()


@pytest.mark.parametrize("kind", ["render-crash", "render-hang"])
@pytest.mark.parametrize("point", ["model load", "model step", "commit", "status round"])
def test_render_worker_death_anywhere_in_the_loop_costs_only_its_page(
        sample_pdfs, tmp_path, monkeypatch, kind, point):
    """The model (0.3 s a page) is slower than rendering, as a real one is, so the worker renders
    ahead and its death can come while the loop is anywhere; here it is held to come at `point`."""
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs[:1], out, world_size=1, unit_pages=2)
    order = [(u.doc, p) for u in (plan.units[i] for i in plan.queues[0]) for p in u.pages()]
    assert len(order) == 6
    # The second page of the second batch: rendered ahead (1 worker x prefetch 2 batches of 2)
    # whichever point the loop is at, and never in the batch at the model when the gate opens.
    guilty = order[3]
    name = Path(plan.docs[guilty[0]].source).name
    monkeypatch.setenv(faults.ENV, faults.value(f"{kind}:{name}:{guilty[1]}"))
    monkeypatch.setenv(faults.GATE_ENV, str(tmp_path / "gate"))
    fault = FaultAt(tmp_path / "gate", point)
    model = HookedModel(0.3, fault)
    w = make_worker(plan, out, 0, HookedRounds(fault), num_workers=1, model=model,
                    render_timeout=1.5)
    if point == "model load":
        w._load = lambda: (fault.at("model load"), model)[1]
    commit = w.writer.commit

    def hooked_commit():
        fault.at("commit")
        return commit()
    w.writer.commit = hooked_commit

    assert w.run() is False
    assert fault.landed == point
    rows = committed(out)
    assert sorted((r["doc_id"], r["page"]) for r in rows) == sorted(all_pages(plan))
    bad = [r for r in rows if r["status"] != "ok"]
    assert [(r["page"], r["status"]) for r in bad] == [(guilty[1], "render_error")]
    reason = "did not finish within 1.5s" if kind == "render-hang" else "crashed (killed by SIGKILL)"
    assert reason in bad[0]["error"], bad[0]["error"]
    assert w.stats.render_recoveries == 1 and w.stats.pages == 6
    check_chunks_hold_whole_units(out)


def test_workers_dying_between_pages_are_replaced_then_a_setup_error(sample_pdfs, tmp_path):
    """A worker that dies on no page blames no page: every claimed page is rendered again; the
    third such death in a row is a broken node, not a bad PDF."""
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs[:1], out, world_size=1, unit_pages=2)
    w = make_worker(plan, out, 0, OneRankRounds(), num_workers=1)
    claimed = w._claim() + w._claim()
    for _ in range(2):
        w._recover_render([(0, -9)])
        assert w._retry == claimed and not w.dataset.failed
    assert w._claim() == claimed  # the retry comes before any new unit
    assert w._claim() == order_of_next_unit(plan, 2)
    with pytest.raises(SetupError, match="3 times in a row between pages"):
        w._recover_render([(0, -9)])


def order_of_next_unit(plan: Plan, i: int) -> list[tuple[int, int]]:
    u = plan.units[plan.queues[0][i]]
    return [(u.doc, p) for p in u.pages()]


def test_status_vector_round_trips_through_the_wire_format():
    s = RankStatus(done_pages=5, claimed=2, finished=1, rate_milli=1500, stop=0, reserve=1,
                   inflight=3, fail=1, render_error=2, error=0)
    assert RankStatus.decode(s.encode()) == s
    with pytest.raises(ValueError):
        RankStatus.decode([0, 1])


class _Proc:
    def __init__(self, alive: bool, exitcode: int | None = None) -> None:
        self._alive, self.exitcode = alive, exitcode

    def is_alive(self) -> bool:
        return self._alive


class _Thread:
    def is_alive(self) -> bool:
        return False


class _TimedOutIter:
    """A DataLoader iterator on CUDA whose pin-memory thread has ended: every wait times out."""

    def __init__(self, workers: list[_Proc]) -> None:
        self._workers, self._pin_memory_thread = workers, _Thread()

    def __next__(self):
        raise RuntimeError("DataLoader timed out after 1.0 seconds")


def test_a_dead_pin_memory_thread_is_not_waited_on_forever(sample_pdfs, tmp_path, monkeypatch):
    """On CUDA a worker dying while its batch is fetched also ends the pin-memory thread, and
    every later wait only times out: that is a recovery when a worker is dead, else an error."""
    import nougat_dist.worker as worker_mod

    monkeypatch.setattr(worker_mod, "WORKER_EXIT_WAIT_S", 0.1)
    monkeypatch.setattr(worker_mod, "discard_workers", lambda it: None)
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs[:1], out, world_size=1, unit_pages=2)
    w = make_worker(plan, out, 0, OneRankRounds(), num_workers=1)
    claimed = w._claim()
    w._it = _TimedOutIter([_Proc(True)])
    with pytest.raises(RuntimeError, match="pin-memory thread ended"):
        w._next_batch()
    w._it = _TimedOutIter([_Proc(False, -9)])
    assert w._next_batch() is None
    assert w.stats.render_recoveries == 1 and w._retry == claimed and w._it is None


# --- length-aware batches (--batching length_aware, the default) ---------------------------------

def claim_order(plan: Plan) -> list[tuple[int, int]]:
    return [(u.doc, p) for u in (plan.units[i] for i in plan.queues[0]) for p in u.pages()]


class Recorder:
    """Watches a worker: the batches its model ran, and at every commit, that each unit the chunk
    completes had every page processed and none waiting in the length-aware window."""

    def __init__(self, w: Worker) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.processed: set[tuple[int, int]] = set()
        self.commits = 0
        index = {d.doc_id: i for i, d in enumerate(w.plan.docs)}
        process, commit = w._process, w.writer.commit

        def hooked_process(batch):
            self.batches.append(list(batch.keys))
            assert self.processed.isdisjoint(batch.keys), "a page processed twice"
            self.processed.update(batch.keys)
            return process(batch)

        def hooked_commit():
            path = commit()
            if path is not None:
                self.commits += 1
                parked = w.window.keys() if w.window is not None else set()
                for key in chunk_units(path):
                    doc_id, first, last = manifest.parse_unit_key(key)
                    pages = {(index[doc_id], p) for p in range(first, last + 1)}
                    assert pages <= self.processed and pages.isdisjoint(parked), key
            return path

        w._process, w.writer.commit = hooked_process, hooked_commit


def test_length_aware_batches_process_every_page_once_and_commit_whole_units(sample_pdfs,
                                                                            tmp_path):
    texts, batches = {}, {}
    for policy in ("document_order", "length_aware"):
        out = tmp_path / policy
        plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
        w = make_worker(plan, out, 0, OneRankRounds(), batching=policy)
        rec = Recorder(w)
        assert w.run() is False
        rows = committed(out)
        assert sorted((r["doc_id"], r["page"]) for r in rows) == sorted(all_pages(plan))
        assert rec.processed == set(claim_order(plan)) and rec.commits > 1
        assert all(len(b) <= 2 for b in rec.batches)
        check_chunks_hold_whole_units(out)
        final = w.rounds.history[-1][0]
        assert final.finished == 1 and final.inflight == 0 and not w.window
        texts[policy] = {(r["doc_id"], r["page"]): r["text"] for r in rows}
        batches[policy] = rec.batches
        order = claim_order(plan)
    assert batches["document_order"] == [order[i:i + 2] for i in range(0, len(order), 2)]
    assert batches["length_aware"] != batches["document_order"], "the window changed nothing"
    assert texts["length_aware"] == texts["document_order"]


class StopWithParkedPages(StopAfter):
    """A stop request once `pages` pages are processed; records the window at that moment."""

    parked_at_stop: set | None = None

    @property
    def requested(self) -> bool:
        if not super().requested:
            return False
        if self.parked_at_stop is None:
            self.parked_at_stop = self.worker.window.keys()
        return True


def test_stop_with_pages_in_the_window_commits_nothing_half_and_resume_does_the_rest(
        sample_pdfs, tmp_path):
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
    stop = StopWithParkedPages(2)
    w = make_worker(plan, out, 0, OneRankRounds(), stop=stop, commit_pages=1000)
    stop.worker = w
    rec = Recorder(w)
    assert w.run() is True
    assert stop.parked_at_stop, "the stop came with no page in the window: proves nothing"
    first = {(r["doc_id"], r["page"]) for r in committed(out)}
    assert 0 < len(first) < len(all_pages(plan))
    check_chunks_hold_whole_units(out)
    ids = [d.doc_id for d in plan.docs]
    # pages left in the window were never processed, and none of them was committed
    assert w.window.keys().isdisjoint(rec.processed)
    assert not {(ids[d], p) for d, p in w.window.keys()} & first

    plan2 = decide_plan(out, plan.entries, 2, 1)
    w2 = make_worker(plan2, out, 0, OneRankRounds())
    assert w2.run() is False
    rows = [(r["doc_id"], r["page"]) for r in committed(out)]
    assert sorted(rows) == sorted(all_pages(plan))  # every page exactly once over both runs
    check_chunks_hold_whole_units(out)


def test_render_recovery_keeps_the_pages_waiting_in_the_window(sample_pdfs, tmp_path,
                                                               monkeypatch):
    """A render worker dies while rendered pages wait in the window: only the pages it had not
    handed over are rendered again; the waiting ones are processed once, from the window. The
    model (0.3 s a page) is slower than rendering, so rendered batches wait in the window."""
    out = tmp_path / "out"
    plan = make_plan(sample_pdfs, out, world_size=1, unit_pages=2)
    order = claim_order(plan)
    assert len(order) == 11
    # The fifth batch of two: batches a render worker sent but the rank had not received when it
    # died are lost with it (their shared memory goes through the sender), so the window holds
    # what came before.
    guilty = order[8]
    name = Path(plan.docs[guilty[0]].source).name
    monkeypatch.setenv(faults.ENV, faults.value(f"render-crash:{name}:{guilty[1]}"))
    w = make_worker(plan, out, 0, OneRankRounds(), num_workers=1, delay=0.3)
    rec = Recorder(w)
    parked: list[set] = []
    recover = w._recover_render

    def hooked(dead):
        parked.append(w.window.keys())
        return recover(dead)
    w._recover_render = hooked

    assert w.run() is False
    assert len(parked) == 1 and parked[0] and guilty not in parked[0], parked
    assert not set(w._retry) and rec.processed == set(order) and w.stats.pages == len(order)
    rows = committed(out)
    assert sorted((r["doc_id"], r["page"]) for r in rows) == sorted(all_pages(plan))
    assert [(r["page"], r["status"]) for r in rows if r["status"] != "ok"] == [
        (guilty[1], "render_error")]
    assert w.stats.render_recoveries == 1
    check_chunks_hold_whole_units(out)
