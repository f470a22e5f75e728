"""cbnorm.cluster_context: one context per thread and per asyncio task."""

import asyncio
import threading

import pytest
import torch

import cbnorm
from cbnorm.context import current_cluster


def distinct_clusters_norm():
    """An SCB-Norm whose two clusters have different statistics, so the ids it uses show in its output."""
    norm = cbnorm.SCBNorm(4, 2).double()
    with torch.no_grad():
        norm.loc.copy_(torch.tensor([[0.0] * 4, [5.0] * 4]))
    return norm


def run_in_threads(*targets):
    """Run ``targets`` in threads and re-raise the first assertion any of them failed."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


class TestClusterContext:
    def test_nested_contexts_restore_the_outer(self):
        outer, inner = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
        assert current_cluster() is None
        with cbnorm.cluster_context(outer) as given:
            assert given is outer and current_cluster() is outer
            with cbnorm.cluster_context(inner):
                assert current_cluster() is inner
            assert current_cluster() is outer
        assert current_cluster() is None

    def test_restored_on_exception(self):
        with pytest.raises(RuntimeError, match="inside"), cbnorm.cluster_context(torch.zeros(2, dtype=torch.long)):
            raise RuntimeError("inside")
        assert current_cluster() is None

    def test_threads_see_their_own_context(self):
        norm, x = distinct_clusters_norm().eval(), torch.randn(6, 4, dtype=torch.float64)
        inside = threading.Barrier(2)

        def worker(cluster: int):
            ids = torch.full((6,), cluster, dtype=torch.long)
            with cbnorm.cluster_context(ids):
                inside.wait(timeout=10)  # both threads are inside their contexts now
                assert current_cluster() is ids
                torch.testing.assert_close(norm(x), norm(x, ids))
                inside.wait(timeout=10)
            assert current_cluster() is None

        with cbnorm.cluster_context(torch.zeros(6, dtype=torch.long)) as main_ids:
            run_in_threads(lambda: worker(0), lambda: worker(1))
            assert current_cluster() is main_ids  # threads start without the main thread's context
        assert current_cluster() is None

    def test_exits_interleaved_across_threads(self):
        """A exits while B is still inside: B keeps its own ids, and A's exit restores A's outer context."""
        a_outer, a_inner, b_ids = (torch.full((2,), i, dtype=torch.long) for i in range(3))
        b_entered, a_exited = threading.Event(), threading.Event()

        def thread_a():
            with cbnorm.cluster_context(a_outer):
                with cbnorm.cluster_context(a_inner):
                    assert b_entered.wait(timeout=10)
                    assert current_cluster() is a_inner
                assert current_cluster() is a_outer
            assert current_cluster() is None
            a_exited.set()

        def thread_b():
            with cbnorm.cluster_context(b_ids):
                b_entered.set()
                assert a_exited.wait(timeout=10)
                assert current_cluster() is b_ids
            assert current_cluster() is None

        run_in_threads(thread_a, thread_b)

    def test_asyncio_tasks_see_their_own_context(self):
        norm, x = distinct_clusters_norm().eval(), torch.randn(6, 4, dtype=torch.float64)

        async def task(cluster: int, switches: list):
            ids = torch.full((6,), cluster, dtype=torch.long)
            with cbnorm.cluster_context(ids):
                for _ in range(3):
                    await asyncio.sleep(0)  # let the other task enter and leave its context
                    switches.append(cluster)
                    assert current_cluster() is ids
                    torch.testing.assert_close(norm(x), norm(x, ids))
            assert current_cluster() is None

        async def both():
            switches = []
            await asyncio.gather(task(0, switches), task(1, switches))
            return switches

        assert asyncio.run(both()) == [0, 1] * 3  # the tasks did interleave inside their contexts
        assert current_cluster() is None

    def test_compiled_model_reads_the_context(self):
        norm, x = distinct_clusters_norm().eval(), torch.randn(6, 4, dtype=torch.float64)
        torch._dynamo.reset()
        model = torch.compile(torch.nn.Sequential(torch.nn.Identity(), norm, torch.nn.Identity()), backend="eager")
        for cluster in (0, 1):
            ids = torch.full((6,), cluster, dtype=torch.long)
            with cbnorm.cluster_context(ids):
                torch.testing.assert_close(model(x), norm(x, ids))
        torch.testing.assert_close(model(x), norm(x))

    def test_compiled_layer_stays_in_one_graph_with_no_context_open(self):
        norm, x = distinct_clusters_norm().eval(), torch.randn(6, 4, dtype=torch.float64)
        with cbnorm.cluster_context(torch.zeros(6, dtype=torch.long)):
            pass  # a block that was open and closed leaves nothing behind
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(norm, fullgraph=True, backend="eager")(x), norm(x))
