"""benchmarks/accelerator.py, the one-command accelerator run, checked on the CPU: its
peak table and MFU arithmetic, its deadlines, that a failing, crashing or hanging item is
recorded while the run goes on, and a tiny run of its real sections (JSON fields)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import accelerator


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"),
])
def test_peak_table_matches_device_kinds(kind, name):
  assert accelerator.peak_for(kind).name == name


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "", None])
def test_unknown_devices_have_no_peak(kind):
  assert accelerator.peak_for(kind) is None
  assert accelerator.peak_tflops(None, "bfloat16") is None


def test_peaks_are_the_datasheets_dense_numbers():
  h100 = accelerator.peak_for("NVIDIA H100 80GB HBM3")
  # Datasheet: BF16 1,979 and TF32 989 TFLOPS with sparsity; dense is half.
  assert (h100.bfloat16, h100.float32, h100.float32_ieee) == (989.5, 494.5, 67.0)
  assert accelerator.peak_for("NVIDIA H200").bfloat16 == h100.bfloat16
  a100 = accelerator.peak_for("NVIDIA A100-SXM4-40GB")
  assert (a100.bfloat16, a100.float32, a100.float32_ieee) == (312.0, 156.0, 19.5)
  for peak in accelerator.PEAKS:
    assert peak.bfloat16 >= peak.float32 > 0 and peak.source
  assert accelerator.peak_tflops(h100, "float32") == 494.5


def test_mfu_and_matmul_ratio_of_the_train_table():
  peak = accelerator.peak_for("NVIDIA H100 80GB HBM3")
  # 2,418 GFLOP per step in 0.05 s: 48.36 TFLOP/s, against 989.5 (bf16) and 494.5 (f32).
  assert accelerator.mfu(2418e9, 0.05, 989.5) == pytest.approx(48.36 / 989.5)
  assert accelerator.mfu(None, 0.05, 989.5) is None
  assert accelerator.mfu(1e9, 0.05, None) is None
  row = dict(status="ok", stage="tokenizer", batch=8, parameters=72.4e6, compile_s=30.0,
             step_s=0.05, images_per_s=160.0, gflop_per_step=2418.0,
             achieved_flops_per_s=2418e9 / 0.05, memory={"total_bytes": 3 * 2**30})
  section = {"items": {
      "matmul": {"status": "ok", "n": 8192, "bfloat16_flops_per_s": 700e12,
                 "float32_flops_per_s": 350e12},
      "tokenizer/bfloat16": dict(row, dtype="bfloat16"),
      "tokenizer/float32": dict(row, dtype="float32"),
      "ar/bfloat16": {"status": "failed", "error": "boom"}}}
  accelerator.finalize_train(section, peak)
  items = section["items"]
  assert items["tokenizer/bfloat16"]["mfu"] == pytest.approx(48.36 / 989.5)
  assert items["tokenizer/float32"]["mfu"] == pytest.approx(48.36 / 494.5)
  assert items["tokenizer/bfloat16"]["matmul_ratio"] == pytest.approx(48.36 / 700)
  assert items["tokenizer/float32"]["matmul_ratio"] == pytest.approx(48.36 / 350)
  assert items["matmul"]["bfloat16_mfu"] == pytest.approx(700 / 989.5)
  assert "tokenizer | bfloat16 | 8 |" in section["table_markdown"]
  assert "ar/bfloat16" not in section["table_markdown"]
  accelerator.finalize_train(section, None)  # An unknown device: MFU null, ratio kept.
  assert items["tokenizer/float32"]["mfu"] is None
  assert items["tokenizer/float32"]["matmul_ratio"] == pytest.approx(48.36 / 350)


def test_section_budgets_leave_the_later_sections_their_reserve():
  order = list(accelerator.SECTION_ORDER)
  shares = accelerator.SHARES
  assert accelerator.section_budget("environment", order, 420, 420) == pytest.approx(
      shares["environment"][0] * 420)
  # Train with 200 s left keeps the sampling reserve.
  assert accelerator.section_budget("train", order[2:], 420, 200) == pytest.approx(
      200 - shares["sampling"][1] * 420)
  assert accelerator.section_budget("sampling", order[3:], 420, 500) == pytest.approx(
      shares["sampling"][0] * 420)
  assert accelerator.section_budget("train", order[2:], 420, 10) == 0.0
  assert accelerator.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
  assert accelerator.device_slug(None) == "unknown-device"


def _run(tmp_path, *argv):
  out = tmp_path / "run.json"
  assert accelerator.main([*argv, "--out", str(out)]) == 0
  return json.loads(out.read_text())


def test_deadline_skips_items_and_sections(tmp_path):
  start = time.perf_counter()
  report = _run(tmp_path, "--inprocess", "--sections", "selftest,environment", "--budget_s",
                "3", "--min_item_s", "2.5", "--selftest_items", "sleep1,ok")
  assert time.perf_counter() - start < 10
  items = report["sections"]["selftest"]["items"]
  assert items["sleep1"]["status"] == "ok" and items["sleep1"]["slept"] == 1.0
  assert items["ok"]["status"] == "skipped (section budget spent)"
  assert report["sections"]["selftest"]["status"] == "partial"
  assert report["sections"]["environment"]["status"] == "skipped (deadline)"
  assert report["complete"] is False


def test_a_failing_item_is_recorded_and_the_run_goes_on(tmp_path):
  report = _run(tmp_path, "--inprocess", "--sections", "selftest", "--selftest_items",
                "ok,raise,ok2")
  items = report["sections"]["selftest"]["items"]
  assert [items[k]["status"] for k in ("ok", "raise", "ok2")] == ["ok", "failed", "ok"]
  assert "RuntimeError: selftest: a failing item" in items["raise"]["error"]
  assert "Traceback" in items["raise"]["traceback"]
  assert report["sections"]["selftest"]["status"] == "partial"
  assert "raise: failed" in report["summary_markdown"]


def test_a_crashing_or_hanging_child_is_recorded_and_the_run_goes_on(tmp_path):
  # Children run `python -m benchmarks.accelerator`: 'exit' kills the first one, a second
  # one runs the rest, and 'hang' is killed at the section's deadline (+ grace).
  start = time.perf_counter()
  report = _run(tmp_path, "--sections", "selftest", "--budget_s", "8", "--grace_s", "1",
                "--min_item_s", "0.5", "--selftest_items", "ok,exit,ok2,hang,ok3")
  assert time.perf_counter() - start < 20
  items = report["sections"]["selftest"]["items"]
  assert items["ok"]["status"] == "ok" and items["ok2"]["status"] == "ok"
  assert items["exit"]["status"] == "crashed" and "code 3" in items["exit"]["error"]
  assert items["hang"]["status"] == "timed out"
  assert items["ok3"]["status"].startswith("skipped")
  assert list(items) == ["ok", "exit", "ok2", "hang", "ok3"]


def test_smoke_sections_write_the_json_fields(tmp_path, monkeypatch):
  # A made-up peak for the CPU, so the MFU arithmetic runs end to end.
  fake = accelerator.DevicePeak("cpu", "fake CPU", 2.0, 1.0, 1.0, "test")
  monkeypatch.setattr(accelerator, "peak_for",
                      lambda kind: fake if (kind or "").lower() == "cpu" else None)
  report = _run(tmp_path, "--smoke", "--inprocess", "--budget_s", "600",
                "--quantizer_functions", "matmul_fwd_bwd,regvq", "--quantizer_reps", "1",
                "--train_items", "matmul,ar/bfloat16", "--steps", "2",
                "--sampling_items", "cache_vs_diffusion/float32")
  env = report["environment"]
  assert env["backend"] == "cpu" and env["device_kind"] and env["jax"] and env["git"]
  assert report["peak"]["name"] == "fake CPU"
  sections = report["sections"]
  assert list(sections) == list(accelerator.SECTION_ORDER)
  for name, section in sections.items():
    assert section["status"] == "ok", (name, section)
    assert 0 <= section["wall_s"] <= section["budget_s"] + 60

  cell = sections["quantizer"]["items"][accelerator.SMOKE_CELLS]
  assert (cell["N"], cell["K"], cell["D"]) == (128, 64, 32)
  assert cell["ratios"]["regvq/matmul"] > 0
  assert cell["matmul_fwd_bwd_tflops"] > 0
  assert "| 128 | 64 | 32 |" in sections["quantizer"]["table_markdown"]

  train = sections["train"]["items"]
  row = train["ar/bfloat16"]
  assert row["stage"] == "ar" and row["dtype"] == "bfloat16" and row["config"] == "smoke"
  for key in ("compile_s", "step_s", "images_per_s", "gflop_per_step", "achieved_tflops"):
    assert row[key] > 0, key
  assert row["mfu"] == pytest.approx(row["gflop_per_step"] * 1e9 / row["step_s"] / 2e12)
  assert row["matmul_ratio"] == pytest.approx(
      row["achieved_flops_per_s"] / train["matmul"]["bfloat16_flops_per_s"])

  sampling = sections["sampling"]
  result = sampling["items"]["cache_vs_diffusion/float32"]
  assert [r["sampler"] for r in result["rows"]] == ["ar cache", "diffusion 8 steps"]
  assert all(r["images_per_s"] > 0 for r in result["rows"])
  assert sampling["ratios"]["float32: diffusion 8 steps vs ar cache (images/s ratio)"] > 0
  assert report["complete"] is True and "## train: ok" in report["summary_markdown"]


def test_terminating_the_run_ends_its_running_child(tmp_path):
  out = tmp_path / "run.json"
  parent = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.accelerator", "--sections", "selftest",
       "--selftest_items", "hang", "--budget_s", "60", "--out", str(out)],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(accelerator.__file__))))
  deadline = time.time() + 15
  while time.time() < deadline:  # Until the child has started its item.
    report = json.loads(out.read_text()) if out.exists() else {}
    items = report.get("sections", {}).get("selftest", {}).get("items", {})
    if items.get("hang", {}).get("status") == "running" and report.get("child_pids"):
      break
    time.sleep(0.2)
  child = report["child_pids"][0]
  parent.send_signal(signal.SIGTERM)
  assert parent.wait(timeout=15) == 128 + signal.SIGTERM
  with pytest.raises(ProcessLookupError):
    os.kill(child, 0)
