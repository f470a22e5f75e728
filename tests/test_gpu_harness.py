"""The GPU harness on the CPU: speed settings, concurrent runs, the time-budget planner."""

import dataclasses
import io
import json
import os
import signal

import pytest
import torch

from cbnorm.experiments import adamatch, gan, speed
from cbnorm.experiments import reproduce as rep
from cbnorm.experiments.data import load_dataset
from cbnorm.experiments.metrics import read_metrics
from cbnorm.experiments.parallel import ProgressDisplay, RunState, run_parallel
from cbnorm.experiments.planner import BudgetError, plan_runs
from cbnorm.experiments.train import TrainConfig, train
from tests.utils import without_time

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_LAYERS = rep.Experiment("table5", "t", "shallow_cnn", (("BN", "batchnorm"), ("UCB-Norm", "ucb")), (0.001, 0.005),
                            3, "adamw", "constant", 64, ("test_error",), "figure5", "figure1", "test_acc")
TINY = rep.Scale("tiny", 128, 64, 2, (0,))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _config(out, **fields):
    return TrainConfig(**{**dict(dataset="digits", train_size=128, test_size=64, batch_size=64, epochs=2, threads=1,
                                 progress=False, out=str(out), resume=True), **fields})


class TestSpeedSettings:
    def test_cuda_only_settings_are_off_on_the_cpu_and_recorded_so(self, tmp_path, digits):
        train(_config(tmp_path / "run", epochs=1), digits)
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert (config["bf16"], config["channels_last"], config["cudnn_benchmark"], config["compile"]) == (
            False, False, False, False)

    def test_resolution_and_autocast_dtype(self):
        cuda, cpu = torch.device("cuda"), torch.device("cpu")
        on = speed.resolve_speed(TrainConfig(), cuda)
        assert (on.bf16, on.channels_last, on.cudnn_benchmark) == (True, True, True)
        assert speed.autocast_dtype(on, cuda) == torch.bfloat16
        fp16 = speed.resolve_speed(TrainConfig(amp=True), cuda)
        assert not fp16.bf16 and speed.autocast_dtype(fp16, cuda) == torch.float16
        off = speed.resolve_speed(TrainConfig(bf16=False, channels_last=False), cuda)
        assert speed.autocast_dtype(off, cuda) is None and speed.memory_format(off) == torch.contiguous_format
        assert speed.autocast_dtype(speed.resolve_speed(TrainConfig(), cpu), cpu) is None

    @pytest.mark.parametrize("kind", ["train", "gan", "adamatch"])
    def test_runs_from_before_the_settings_or_from_another_device_resume(self, tmp_path, digits, kind):
        """Every kind of run records the settings it used (all off on the CPU); its first epoch's checkpoint
        without them, or without a loss scaler (as before either existed), or started on CUDA, resumes to the
        same second epoch."""
        trainer, config = _run(kind, tmp_path / "run", digits)
        history = trainer(config)
        recorded = json.loads((tmp_path / "run" / "config.json").read_text())
        assert {name: recorded[name] for name in speed.SPEED_FIELDS} == dict.fromkeys(speed.SPEED_FIELDS, False)
        first = torch.load(tmp_path / "run" / "checkpoint-previous.pt", weights_only=True)
        assert len(first["history"]) == 1
        for saved in ({}, {"bf16": True, "channels_last": True, "cudnn_benchmark": True}):  # older; started on CUDA
            state = dict(first, config={**{k: v for k, v in first["config"].items() if k not in speed.SPEED_FIELDS},
                                        **saved})
            state.pop("scaler", None)
            torch.save(state, tmp_path / "run" / "checkpoint.pt")
            assert without_time(trainer(config)) == without_time(history)

    def test_every_reproduction_gives_its_runs_the_speed_settings(self, tmp_path):
        settings = {"channels_last": False, "compile": True}
        specs = [(rep.Classification(experiment=TWO_LAYERS, dataset="digits"), TINY),
                 (gan.DCGAN(dataset="digits", fid_features="random-conv"), gan.GAN_SCALES["smoke"]),
                 (adamatch.AdaMatch(source="mnist", target="digits"), adamatch.ADAMATCH_SCALES["smoke"])]
        for spec, scale in specs:
            key = spec.runs(scale, (0,))[-1][0]
            given = dataclasses.replace(spec, speed_settings=settings).configure(key, scale, tmp_path)
            default = spec.configure(key, scale, tmp_path)
            assert (given.bf16, given.channels_last, given.cudnn_benchmark, given.compile) == (True, False, True, True)
            assert (default.channels_last, default.compile) == (True, False)

    def test_a_compiled_adamatch_run_probes_the_gradient_variance_as_the_eager_one(self, tmp_path, digits):
        """The probe takes two gradients of one compiled graph, which torch's donated buffers would refuse."""
        runs = [adamatch.train_adamatch(adamatch.AdaMatchConfig(**ADAMATCH_RUN, norm="scb", epochs=1, threads=1,
                                                                progress=False, compile=compile,
                                                                out=str(tmp_path / str(compile))), digits, digits)
                for compile in (False, True)]
        eager, compiled = (history[0] for history in runs)
        for key in ("loss", "grad_var_source_mean", "grad_var_target_mean"):  # fused kernels round differently
            assert compiled[key] == pytest.approx(eager[key], rel=1e-2)
        assert json.loads((tmp_path / "True" / "config.json").read_text())["compile"] is True

    def test_a_checkpoint_missing_a_state_is_refused_before_anything_loads(self, tmp_path, digits):
        trainer, config = _run("gan", tmp_path / "run", digits)
        trainer(config)
        path = tmp_path / "run" / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        del state["opt_d"]
        torch.save(state, path)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=r"expected its checkpoint to hold \['discriminator', 'generator', "
                                             r"'opt_d', 'opt_g', 'scaler'\], got no opt_d; pass --overwrite"):
            trainer(config)
        assert path.read_bytes() == before


def _run(kind: str, out, digits):
    """``(trainer(config), config)`` of a 2-epoch run of ``kind`` on digits, resumable in ``out``."""
    common = dict(epochs=2, threads=1, progress=False, out=str(out), resume=True)
    if kind == "train":
        return lambda config: train(config, digits), _config(out)
    if kind == "gan":
        config = gan.GANConfig(**GAN_RUN, norm="ucb", **common)
        return lambda config: gan.train_gan(config, digits), config
    config = adamatch.AdaMatchConfig(**ADAMATCH_RUN, norm="scb", **common)
    return lambda config: adamatch.train_adamatch(config, digits, digits), config


GAN_RUN = dict(dataset="digits", train_size=64, width=8, batch_size=32, fid_every=2, fid_samples=16, fid_reference=16,
               fid_features="random-conv")
ADAMATCH_RUN = dict(source_train_size=32, target_train_size=32, source_test_size=16, target_test_size=16, depth=10,
                    width=1, batch_size=16, uratio=1, image_size=16)


class TestLossScaling:
    """The float16 autocast's loss scaler (CUDA), exercised on the CPU in float32: with a power-of-two scale,
    scaling the losses and unscaling the gradients is exact, so a step must equal the unscaled one bitwise."""

    cpu = torch.device("cpu")

    @staticmethod
    def scalers():
        return [torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0**10,
                                                                                 growth_interval=1)]

    def test_gan_steps(self, digits):
        config = speed.resolve_speed(gan.GANConfig(**GAN_RUN, norm="ucb"), self.cpu)
        results, scalers = [], self.scalers()
        for scaler in scalers:
            torch.manual_seed(0)
            loader, stateful, _ = gan._setup(config, digits, self.cpu)
            images = next(loader.epoch(1))[0]
            g, d, opt_g, opt_d = (stateful[k] for k in ("generator", "discriminator", "opt_g", "opt_d"))
            losses = [gan.gan_step(g, d, images, opt_g, opt_d, scaler, config, self.cpu) for _ in range(3)]
            results.append((losses, g.state_dict(), d.state_dict()))
        assert scalers[1].get_scale() == 2.0**13  # one update per step (of both networks), each growing it
        (losses, *nets), (scaled_losses, *scaled_nets) = results
        assert losses == scaled_losses
        assert all(torch.equal(a[k], b[k]) for a, b in zip(nets, scaled_nets) for k in a)

    def test_adamatch_steps_and_their_gradient_variance(self, digits):
        config = speed.resolve_speed(adamatch.AdaMatchConfig(**ADAMATCH_RUN, norm="scb", grad_every=1), self.cpu)
        results, scalers = [], self.scalers()
        for scaler in scalers:
            torch.manual_seed(0)
            data, stateful, _ = adamatch._setup(config, digits, digits, self.cpu)
            xs, ys, xt, _ = next(adamatch._epoch_batches(config, data, 1))
            augmentation = torch.Generator().manual_seed(0)
            model, optimizer, scheduler = (stateful[k] for k in ("model", "optimizer", "scheduler"))
            measured = [adamatch.adamatch_step(model, xs, ys, xt, 0.5, augmentation, optimizer, scheduler, scaler,
                                               config, self.cpu, probe=True)[2] for _ in range(2)]
            results.append((measured, model.state_dict()))
        assert scalers[1].get_scale() == 2.0**12
        (measured, weights), (scaled_measured, scaled_weights) = results
        assert measured == scaled_measured and all(v > 0 for pair in measured for v in pair)
        assert all(torch.equal(weights[k], scaled_weights[k]) for k in weights)


class TestParallel:
    def test_parallel_runs_give_the_sequential_metrics(self, tmp_path, digits):
        experiment = dataclasses.replace(TWO_LAYERS, lrs=(0.005,))
        kwargs = dict(seeds=(0,), progress=False, command="test", threads=1, data=digits)
        one = rep.reproduce(experiment, "digits", TINY, out=tmp_path / "one", **kwargs)
        two = rep.reproduce(experiment, "digits", TINY, out=tmp_path / "two", parallel=2, **kwargs)
        names = sorted(p.name for p in (one / "runs").iterdir())
        assert names == sorted(p.name for p in (two / "runs").iterdir()) and len(names) == 2
        for name in names:
            sequential, parallel = (read_metrics(root / "runs" / name)[1] for root in (one, two))
            assert without_time(sequential) == without_time(parallel)
        summary = json.loads((two / "summary.json").read_text())
        assert summary["parallel"] == 2 and summary["device_name"]
        assert list(summary["seconds_per_epoch"]) == ["BN, lr 0.005", "UCB-Norm, lr 0.005"]
        assert all(seconds > 0 for seconds in summary["seconds_per_epoch"].values())
        assert "UCB-Norm, lr 0.005: " in (two / "table.md").read_text().split("Time per run on")[1]
        assert (two / "logs" / f"{names[0]}.log").read_text()

    def test_parallel_dcgan_runs_give_the_sequential_metrics(self, tmp_path, digits, monkeypatch):
        """Another trainer (train_gan) in the spawned processes: the same per-run metrics, FID included."""
        monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path / "cache"))  # the children inherit it
        kwargs = dict(seeds=(0,), progress=False, command="test", threads=1, data=digits, fid_features="random-conv",
                      norms=gan.GAN_NORMS[:2])
        scale = gan.GANScale("tiny", 64, 2, 1, 16, 24)
        one = gan.reproduce_dcgan("digits", scale, out=tmp_path / "one", **kwargs)
        two = gan.reproduce_dcgan("digits", scale, out=tmp_path / "two", parallel=2, **kwargs)
        names = sorted(p.name for p in (one / "runs").iterdir())
        assert names == sorted(p.name for p in (two / "runs").iterdir()) == ["batchnorm-seed0", "mn-seed0"]
        for name in names:
            sequential, parallel = (read_metrics(root / "runs" / name)[1] for root in (one, two))
            assert without_time(sequential) == without_time(parallel) and "fid_star" in parallel[-1]
        summary = json.loads((two / "summary.json").read_text())
        assert summary["parallel"] == 2 and summary["scale"]["fid_samples"] == 16
        assert (two / "logs" / f"{names[0]}.log").read_text()

    def test_a_failed_run_is_recorded_and_the_others_go_on(self, tmp_path, digits):
        configs = {"good": _config(tmp_path / "runs" / "good"), "bad": _config(tmp_path / "runs" / "bad", norm="nope")}
        display = ProgressDisplay(io.StringIO())
        histories, failures = run_parallel([("bad", "bad"), ("good", "good")], configs.get, 2, digits, display)
        assert list(histories) == ["good"] and len(histories["good"]) == 2
        assert list(failures) == ["bad"] and "nope" in failures["bad"]

    def test_a_run_killed_mid_way_resumes_exactly(self, tmp_path, digits):
        # The killed run is long (30 epochs of about 0.1 s) so that the parent, polling every 5 ms, sees it
        # between its 2nd and last epoch even when a loaded machine starves it for seconds.
        reference = train(_config(tmp_path / "reference", epochs=30), digits)
        configs = {"killed": _config(tmp_path / "runs" / "killed", epochs=30),
                   "other": _config(tmp_path / "runs" / "other", epochs=3)}

        class KillAfterTwoEpochs(ProgressDisplay):
            def update(self, states):
                for state in states:
                    if state.key == "killed" and state.status == "running" and len(state.history) >= 2:
                        os.kill(state.process.pid, signal.SIGKILL)
                super().update(states)

        runs = [("killed", "killed"), ("other", "other")]
        display = KillAfterTwoEpochs(io.StringIO())
        histories, failures = run_parallel(runs, configs.get, 2, digits, display, poll_seconds=0.005)
        assert list(failures) == ["killed"] and "exit code -9" in failures["killed"]
        killed_at = len(torch.load(tmp_path / "runs" / "killed" / "checkpoint.pt", weights_only=True)["history"])
        assert 2 <= killed_at < 30
        assert without_time(histories["other"]) == without_time(reference[:3])  # a constant rate: a prefix
        histories, failures = run_parallel(runs[:1], configs.get, 2, digits, ProgressDisplay(io.StringIO()))
        assert not failures and without_time(histories["killed"]) == without_time(reference)

    def test_the_display_shows_every_run_on_one_screen(self, tmp_path):
        class Terminal:
            def __init__(self):
                self.text = ""

            def write(self, text):
                self.text += text

            def flush(self):
                pass

            def isatty(self):
                return True

        states = [RunState(k, f"run {k}", _config(tmp_path / k, epochs=4)) for k in "ab"]
        terminal = Terminal()
        display = ProgressDisplay(terminal)
        display.update(states)
        states[0].status, states[0].history = "running", [{"epoch": 1, "test_acc": 0.5, "seconds": 2.0}]
        display.update(states)
        first, second = terminal.text.split("\x1b[3F\x1b[J")  # redrawn over the 3 lines shown
        assert "0 running, 0 done, 0 failed, 2 waiting" in first
        assert "run a" in second and "epoch   1/4" in second and "50.00%" in second and "2.0 s/epoch" in second
        assert "run b" in second and "1 running" in second

    def test_a_log_gets_each_line_as_it_changes(self, tmp_path):
        log = io.StringIO()
        states = [RunState(k, f"run {k}", _config(tmp_path / k, epochs=4)) for k in "ab"]
        display = ProgressDisplay(log)
        display.update(states)
        states[0].status = "running"
        display.update(states)
        display.update(states)
        assert log.getvalue().splitlines() == [states[0].line().replace("running", "waiting"), states[1].line(),
                                               states[0].line()]


    def test_long_titles_keep_one_column(self, tmp_path):
        log = io.StringIO()
        titles = ["BN, lr 0.005, seed 0", "UCB-Norm (moving_average), lr 0.005, seed 0"]
        states = [RunState(t, t, _config(tmp_path / str(i), epochs=30)) for i, t in enumerate(titles)]
        for state in states:
            state.status, state.history = "running", [{"epoch": 1, "test_acc": 0.5, "seconds": 2.0}]
        ProgressDisplay(log).update(states)
        lines = log.getvalue().splitlines()
        assert len({line.index("epoch") for line in lines}) == 1 and lines[1].startswith(titles[1] + " epoch")

class TestTimeBudget:
    SECONDS = {"batchnorm": 1.0, "ucb": 2.0}  # per epoch

    def test_whole_rounds_then_the_layers_that_fit(self):
        plan = plan_runs(TWO_LAYERS, self.SECONDS, 100, seeds=(0, 1, 2), epochs=10)  # a round: 30 s
        assert plan.runs == (("batchnorm", 0.001, 0), ("ucb", 0.001, 0), ("batchnorm", 0.005, 0), ("ucb", 0.005, 0),
                             ("batchnorm", 0.001, 1), ("ucb", 0.001, 1), ("batchnorm", 0.005, 1))
        assert plan.seconds == 100 and plan.considered == 12 and plan.epochs == 10

    def test_refuses_when_not_one_run_fits(self):
        with pytest.raises(BudgetError, match="not even one run fits the time budget of 0.1 min: the cheapest, "
                                              "batchnorm, takes about 0.2 min for 10 epochs"):
            plan_runs(TWO_LAYERS, self.SECONDS, 6, seeds=(0,), epochs=10)

    def test_reproduce_refuses_before_training(self, tmp_path, digits):
        timer = lambda *args: self.SECONDS  # noqa: E731
        with pytest.raises(BudgetError, match="or --epochs to plan fewer epochs"):
            rep.reproduce(TWO_LAYERS, "digits", dataclasses.replace(TINY, epochs=100), out=tmp_path, data=digits,
                          time_budget=1, timer=timer, progress=False, command="test")
        assert not (tmp_path / "results" / "table5-digits" / "tiny" / "runs").exists()

    def test_reproduce_runs_the_plan_and_says_so(self, tmp_path, digits):
        timer = lambda *args: self.SECONDS  # noqa: E731  # 100 epochs do not fit 1 minute; --epochs 2: 2 runs do
        root = rep.reproduce(TWO_LAYERS, "digits", dataclasses.replace(TINY, epochs=100), out=tmp_path, data=digits,
                             time_budget=0.2, epochs=2, timer=timer, threads=1, progress=False, command="test")
        assert sorted(p.name for p in (root / "runs").iterdir()) == [
            "batchnorm-lr0.001-seed0", "batchnorm-lr0.005-seed0", "ucb-lr0.001-seed0", "ucb-lr0.005-seed0"]
        table = (root / "table.md").read_text()
        assert ("Only part of the protocol ran, as planned by --time-budget: time budget 0.2 min: 4 of 12 runs at "
                "2 epochs") in table
        summary = json.loads((root / "summary.json").read_text())
        assert summary["plan"]["runs"][0] == ["batchnorm", 0.001, 0] and summary["scale"]["epochs"] == 2
        assert summary["seeds"] == [0] and all(row["status"] == "ok" for row in summary["rows"])

    def test_the_command_stops_with_what_one_run_takes(self, tmp_path, monkeypatch, capsys):
        from cbnorm.experiments.cli import main

        monkeypatch.setattr(rep, "time_epochs", lambda *args: {norm: 60.0 for norm in args[5]})
        argv = ["reproduce", "table5", "--dataset", "digits", "--scale", "smoke", "--out", str(tmp_path),
                "--time-budget", "1.5", "--no-progress"]
        assert main(argv) == 2
        assert "not even one run fits the time budget of 1.5 min: the cheapest, batchnorm, takes about 2.0 min" in (
            capsys.readouterr().err)
        assert not (tmp_path / "results" / "table5-digits" / "smoke" / "runs").exists()
        assert main(argv + ["--epochs", "1", "--parallel", "2"]) == 0  # a minute a run: one fits; it loads the data
        summary = json.loads((tmp_path / "results" / "table5-digits" / "smoke" / "summary.json").read_text())
        assert summary["plan"]["runs"] == [["batchnorm", 0.001, 0]] and summary["scale"]["epochs"] == 1
        assert [row["status"] for row in summary["rows"]][:2] == ["ok", "not run: outside the --time-budget plan"]
        assert summary["parallel"] == 2

    def test_runs_without_a_learning_rate_are_layer_and_seed(self):
        plan = plan_runs(None, self.SECONDS, 70, seeds=(0, 1, 2), epochs=10, norms=["batchnorm", "ucb"], lrs=())
        assert plan.runs == (("batchnorm", 0), ("ucb", 0), ("batchnorm", 1), ("ucb", 1), ("batchnorm", 2))
        assert plan.considered == 6 and plan.seconds == 70
        assert plan.describe().endswith("runs (layer, seed): (batchnorm, 0), (ucb, 0), (batchnorm, 1), (ucb, 1), "
                                        "(batchnorm, 2)")

    @pytest.mark.parametrize("experiment, module, timing, first", [
        ("dcgan", gan, "time_gan_epochs", "batchnorm"), ("adamatch", adamatch, "time_adamatch_epochs", "none")])
    def test_dcgan_and_adamatch_stop_or_run_what_fits(self, tmp_path, monkeypatch, capsys, experiment, module, timing,
                                                      first):
        from cbnorm.experiments.cli import main

        monkeypatch.setattr(module, timing, lambda *args: {norm: 60.0 for norm in args[-1]})
        data = ["--dataset", "digits", "--fid-features", "random-conv"] if experiment == "dcgan" else [
            "--source", "digits", "--target", "digits"]
        argv = ["reproduce", experiment, "--scale", "smoke", "--out", str(tmp_path), "--no-progress", "--threads", "1",
                "--time-budget", "1.5", *data]
        assert main(argv) == 2
        assert (f"not even one run fits the time budget of 1.5 min: the cheapest, {first}, takes about 2.0 min for 2 "
                "epochs") in capsys.readouterr().err
        assert main(argv + ["--epochs", "1"]) == 0  # a minute a run: one fits
        root = next((tmp_path / "results").iterdir()) / "smoke"
        assert [p.name for p in (root / "runs").iterdir()] == [f"{first}-seed0"]
        summary = json.loads((root / "summary.json").read_text())
        assert summary["plan"]["runs"] == [[first, 0]] and summary["scale"]["epochs"] == 1
        assert [row["status"] for row in summary["rows"]][:2] == ["ok", "not run: outside the --time-budget plan"]
        assert f"runs (layer, seed): ({first}, 0)" in (root / "table.md").read_text()

    def test_timing_on_this_device(self, digits):
        from cbnorm.experiments.planner import time_epochs

        seconds = time_epochs(TWO_LAYERS, digits, 128, 64, torch.device("cpu"), ["batchnorm", "ucb"], steps=1, warmup=1)
        assert set(seconds) == {"batchnorm", "ucb"} and all(s > 0 for s in seconds.values())
