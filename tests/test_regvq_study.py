"""The Reg-VQ study script's bookkeeping (no training): every row builds a valid config,
and the doc's tables are computed from the JSON alone."""
import argparse
import copy

import numpy as np
import pytest
import scipy.stats

from benchmarks import regvq_study


def _args(**overrides):
  return argparse.Namespace(**{"idx_dir": "", **overrides})


@pytest.mark.parametrize("row", regvq_study.ROWS, ids=lambda row: row.key)
def test_every_row_builds_a_valid_config_with_its_settings(row):
  config = regvq_study.build_config(row, row.seeds[-1], _args())
  tokenizer = config.tokenizer
  assert config.seed == row.seeds[-1]
  assert tokenizer.quantizer.kind == row.kind and tokenizer.quantizer.num_codes == row.num_codes
  for name, value in row.quantizer:
    assert tokenizer.quantizer[row.kind][name] == value, name
  for name, value in row.loss:
    assert tokenizer.loss[name] == value, name
  assert config.stages == ("tokenizer",) + row.priors
  # At least K token positions per batch for K = 1,024 (review's condition on the KL).
  grid = regvq_study.SCALE["image_size"] // 4
  if row.num_codes == 1024:
    assert tokenizer.train.batch_size * grid * grid >= 1024
  assert tokenizer.loss.perceptual_weight > 0  # LPIPS on in every row.
  assert tokenizer.loss.disc_start > tokenizer.train.num_steps  # GAN off, as documented.


def _cells(line: str) -> list[str]:
  """A Markdown table line's cells, stripped."""
  return [cell.strip() for cell in line.strip("|").split("|")]


def _results(metric_values):
  """A JSON with the ladder's VQGAN and PCL rungs at 3 seeds (usage only)."""
  rows = {}
  for key, values in metric_values.items():
    for seed, value in enumerate(values):
      rows[f"{key}_s{seed}"] = {"name": f"{key}_s{seed}",
                                "stages": {"tokenizer": {"metrics": {"usage": value},
                                                         "wall_s": 60.0}}}
  return {"scale": regvq_study.SCALE, "rows": rows, "environments": []}


def test_tables_are_mean_and_sample_std_of_the_json_and_spread_is_judged():
  results = _results({"vqgan": [0.02, 0.03, 0.04], "pcl": [0.90, 0.92, 0.94]})  # Δ 0.89
  table = regvq_study._table(results, ["vqgan", "pcl", "mask"], priors=())
  vq_line = next(line for line in table.splitlines() if line.startswith("| VQGAN"))
  assert "| 3 | 3 ± 1 |" in vq_line  # 100 × mean 0.03, sample std 0.01
  assert "not run" in table.splitlines()[-1]  # The mask rung has no rows.
  differences = regvq_study._differences(results, [("vqgan", "pcl")], [("tokenizer", "usage")])
  cells = _cells(differences.splitlines()[-1])
  assert cells[2] == "+0.89" and cells[4] == "yes"
  close = _results({"vqgan": [0.5, 0.6, 0.7], "pcl": [0.55, 0.65, 0.75]})
  cells = _cells(regvq_study._differences(close, [("vqgan", "pcl")],
                                          [("tokenizer", "usage")]).splitlines()[-1])
  # Within the unpaired spread; paired by seed, the same +0.05 in every seed is beyond it.
  assert cells[4] == "no" and cells[7] == "yes"
  np.testing.assert_allclose(np.std([0.02, 0.03, 0.04], ddof=1), 0.01)


def test_pairing_by_seed_removes_a_seed_effect_shared_by_the_rungs():
  # Seed effects of ±10 shared by both rows hide a steady +1 from the unpaired rule.
  seed_effect = [0.0, 10.0, -10.0]
  results = _results({"cl": [50 + e for e in seed_effect],
                      "pcl": [51 + e + n for e, n in zip(seed_effect, [0.1, -0.1, 0.0])]})
  changes = regvq_study.paired_differences(results, "cl", "pcl", "tokenizer", "usage")
  np.testing.assert_allclose(changes, [1.1, 0.9, 1.0])
  cells = _cells(regvq_study._differences(results, [("cl", "pcl")],
                                          [("tokenizer", "usage")]).splitlines()[-1])
  assert cells[4] == "no" and cells[5] == "+1.1, +0.9, +1" and cells[7] == "yes"
  assert regvq_study.compare_paired(changes, "lower").endswith(": disagrees")
  assert regvq_study.compare_paired(changes, "higher").endswith(": agrees")
  assert regvq_study.compare_paired([1.0, -1.0, 0.5], "higher").endswith(": unresolved")
  # Two pairs are not judged, whatever they show.
  two = _results({"cl": [50, 60], "pcl": [51, 61]})
  assert regvq_study.compare_paired(regvq_study.paired_differences(
      two, "cl", "pcl", "tokenizer", "usage"), "higher") == "unresolved (2 seed pairs)"
  assert regvq_study._differences(two, [("cl", "pcl")], [("tokenizer", "usage")]).rstrip(
      ).endswith("| — | — (2 pairs) |")


def test_a_seed_missing_from_either_row_is_left_out_of_the_pairs():
  results = _results({"cl": [1.0, 2.0, 3.0], "pcl": [1.5, 2.5, 3.5]})
  del results["rows"]["cl_s1"]
  assert regvq_study.paired_differences(results, "cl", "pcl", "tokenizer", "usage") == [
      0.5, 0.5]


@pytest.mark.parametrize("seed", range(20))
def test_both_spread_rules_are_the_t_tests_they_are_documented_as(seed):
  """Against scipy's t-tests: at 3 seeds the unpaired rule is |t| > √6 on 4 degrees of
  freedom, the paired rule |t| > 2√3 on 2."""
  rng = np.random.default_rng(seed)
  va, vb = rng.normal(0, 1, 3), rng.normal(rng.uniform(-3, 3), 1, 3)
  unpaired = abs(np.mean(vb) - np.mean(va)) > 2 * regvq_study.pooled_std(va, vb)
  assert unpaired == (abs(scipy.stats.ttest_ind(vb, va).statistic) > np.sqrt(6))
  mean, spread = regvq_study.judge_paired(list(vb - va))
  assert (abs(mean) > spread) == (
      abs(scipy.stats.ttest_rel(vb, va).statistic) > 2 * np.sqrt(3))


def test_both_spread_rules_are_two_sided_tests_at_about_7_percent():
  np.testing.assert_allclose(2 * scipy.stats.t.sf(np.sqrt(6), 4), 0.070, atol=5e-4)
  np.testing.assert_allclose(2 * scipy.stats.t.sf(2 * np.sqrt(3), 2), 0.074, atol=5e-4)


def test_plan_runs_first_seeds_first_and_skips_rows_in_the_json():
  args = argparse.Namespace(only="", sections="ladder", seeds="")
  plan = regvq_study.selected(args)
  seeds = [seed for _, seed in plan]
  assert seeds[:5] == [0] * 5 and set(seeds[5:]) == {1, 2}
  assert len(plan) == 15


def test_a_claim_agrees_only_beyond_the_spread_in_the_papers_direction():
  # Spread: pooled sample std 0.1 → 2 × 0.1 = 0.2.
  text, verdict = regvq_study.compare_rows([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], "higher")
  assert verdict == "agrees" and "+1" in text and "0.2" in text
  assert regvq_study.compare_rows([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], "lower")[1] == "disagrees"
  within = regvq_study.compare_rows([1.0, 1.1, 1.2], [1.1, 1.2, 1.3], "higher")[1]
  assert within.startswith("unresolved (within the spread") and "the paper's way" in within
  one_seed = regvq_study.compare_rows([1.0], [0.5], "higher")[1]
  assert one_seed.startswith("unresolved (1 seed") and "the other way" in one_seed
  assert regvq_study.compare_rows([], [0.5], "higher")[1] == "unresolved (not run)"


def test_the_verdict_table_reads_the_json():
  results = _results({"vqgan": [0.02, 0.03, 0.04], "prior_kl": [0.96, 0.97, 0.98]})
  verdict = regvq_study._verdict(results)
  collapse = next(line for line in verdict.splitlines() if line.startswith("| 1. "))
  cells = _cells(collapse)
  assert cells[3] == "usage %: 3 ± 1 (3) → 97 ± 1 (3)" and cells[5] == "agrees"
  # Paired by seed, every seed rose by 94 points: no spread at all, the paper's way.
  assert cells[6] == "+94, +94, +94 (2 × std 0): agrees"
  goal = next(line for line in verdict.splitlines() if "K = 1,024 in use" in line)
  assert "| prior_kl | 97 ± 1 (3 seeds) | yes |" in goal
  assert "| not run | — | unresolved | regvq_k16384 | — | — |" in verdict  # K = 16,384 absent.


def test_a_verification_is_rendered_with_its_differences():
  results = _results({"vqgan": [0.02]})
  results["verifications"] = {"vqgan_s0": {"date": "2026-12-01T06:00:00+00:00", "metrics": {
      "tokenizer/usage": {"recorded": 0.02, "rerun": 0.02, "identical": True},
      "ar/gfd_vgg": {"recorded": 50.0, "rerun": 50.5, "identical": False}}}}
  text = regvq_study.render(results, "/nonexistent")
  line = next(line for line in text.split("\n\n") if line.startswith("**Determinism.**"))
  assert "`--verify=vqgan_s0`" in line and "1 of 2 recorded metrics identical" in line
  assert "ar/gfd_vgg (50.0 → 50.5)" in line


def test_writing_the_doc_keeps_the_readmes_verdict_quote_current(tmp_path, monkeypatch):
  monkeypatch.setattr(regvq_study, "_REPO", str(tmp_path))
  (tmp_path / "docs" / "results").mkdir(parents=True)
  readme = tmp_path / "README.md"
  readme.write_text(f"before\n{regvq_study.README_BEGIN}\nstale\n{regvq_study.README_END}\n"
                    "after\n")
  results = _results({"vqgan": [0.02, 0.03, 0.04], "prior_kl": [0.96, 0.97, 0.98]})
  regvq_study.write_doc(results, str(tmp_path / "docs" / "results"))
  text = readme.read_text()
  assert "stale" not in text and text.startswith("before\n") and text.endswith("after\n")
  assert "3 ± 1 (3) → 97 ± 1 (3)" in text and "_From 6 of " in text


def test_rows_are_grouped_by_the_machine_and_classifier_they_ran_with():
  results = _results({"vqgan": [0.02, 0.03], "pcl": [0.9]})
  results["environments"] = [{"cpu_model": "AMD EPYC", "date": "d0"},
                             {"cpu_model": "Intel Xeon", "date": "d1"}]
  results["rows"]["vqgan_s1"]["machine"] = {"cpu_model": "Intel Xeon", "date": "d1"}
  for name, accuracy in (("vqgan_s0", 0.9103), ("vqgan_s1", 0.9087)):
    results["rows"][name]["stages"]["ar"] = {"metrics": {"class_accuracy_real": accuracy}}
  lines = regvq_study._machines(results).splitlines()
  assert "- Intel Xeon (classifier 90.87 % on t10k): vqgan_s1" in lines
  assert "- not recorded (classifier 91.03 % on t10k): vqgan_s0" in lines
  assert "- not recorded (no prior): pcl_s0" in lines
  # The unrecorded rows can only have run on the environments no recorded row claims.
  assert lines[-1].endswith("other environments are: AMD EPYC.")


def test_a_finished_row_is_merged_into_the_json_as_it_is_on_disk_now(tmp_path, monkeypatch):
  """Rows take ~20 minutes: whatever another process wrote meanwhile survives the save,
  and the row records the machine it ran on."""
  import json
  machine = {"description": "cpu (cpu), host CPU Test", "cpu_model": "Test", "date": "now"}
  monkeypatch.setattr(regvq_study, "environment", lambda: dict(machine))
  path = tmp_path / regvq_study.JSON_NAME

  def fake_train_row(row, seed, args):
    written_meanwhile = _results({"pcl": [0.9]})
    written_meanwhile["verifications"] = {"pcl_s0": {"date": "d", "metrics": {}}}
    path.write_text(json.dumps(written_meanwhile))
    return _results({row.key: [0.03]})["rows"][row.name(seed)]

  monkeypatch.setattr(regvq_study, "train_row", fake_train_row)
  monkeypatch.setattr(regvq_study, "write_doc", lambda results, output_dir: None)
  assert regvq_study.main(["--only=vqgan_s0", f"--output_dir={tmp_path}"]) == 0
  saved = json.loads(path.read_text())
  assert set(saved["rows"]) == {"pcl_s0", "vqgan_s0"} and "pcl_s0" in saved["verifications"]
  assert saved["rows"]["vqgan_s0"]["machine"] == machine
  assert saved["environments"] == [machine]


def test_a_run_whose_rows_all_fail_renders_the_doc_from_the_json_unchanged(tmp_path,
                                                                           monkeypatch):
  """A failed row stays out of the JSON, and so does the machine it failed on: the doc
  written at the end must be the one `--render` gives from the JSON."""
  import json
  machine = {"description": "cpu (cpu), host CPU New", "cpu_model": "New", "date": "now"}
  monkeypatch.setattr(regvq_study, "environment", lambda: dict(machine))
  path = tmp_path / regvq_study.JSON_NAME
  before = json.loads(json.dumps(_results({"pcl": [0.9]})))  # Tuples as JSON reads them.
  path.write_text(json.dumps(before))

  def failing_train_row(row, seed, args):
    raise RuntimeError("broken row")

  rendered = []
  monkeypatch.setattr(regvq_study, "train_row", failing_train_row)
  monkeypatch.setattr(regvq_study, "write_doc",
                      lambda results, output_dir: rendered.append(json.dumps(results)))
  assert regvq_study.main(["--only=vqgan_s0", f"--output_dir={tmp_path}"]) == 1
  assert json.loads(path.read_text()) == before
  assert rendered and all(json.loads(doc) == before for doc in rendered)


def test_each_usage_knob_is_costed_against_the_mask_rung_with_its_spread():
  # Mask rung: usage 0.60 ± 0.01 (3 seeds), PSNR 14.0 ± 0.1; knobs with one seed each.
  results = _results({"mask": [0.59, 0.60, 0.61], "kl1.0": [0.80], "r0.2": [0.605]})
  for name, psnr in (("mask_s0", 13.9), ("mask_s1", 14.0), ("mask_s2", 14.1),
                     ("kl1.0_s0", 13.0), ("r0.2_s0", 14.05)):
    results["rows"][name]["stages"]["tokenizer"]["metrics"]["psnr"] = psnr
  lines = regvq_study._knob_costs(results).splitlines()
  assert lines[2].startswith("| + stochastic mask (r = 0.4) (reference) | 3 | 60 ± 1 |")
  knob = next(line for line in lines if line.startswith("| Reg-VQ, λ_kl = 1 |"))
  # Δ usage +20 points and Δ PSNR −1.0 dB: both beyond 2 × 1 point and 2 × 0.1 dB.
  assert "| 80 (+20 †) |" in knob and "| 13 (-1 †) |" in knob
  small = next(line for line in lines if line.startswith("| r = 0.2 |"))
  assert "| 60.5 (+0.5) |" in small and "| 14.05 (+0.05) |" in small  # within: no †
  assert not any(line.startswith("| r = 0.6 |") for line in lines)  # not run: left out
  goal = next(line for line in regvq_study._verdict(results).splitlines()
              if "K = 1,024 in use" in line)
  assert goal.startswith("| ≥ 95 % of K = 1,024 in use (Reg-VQ family) | kl1.0 | 80 (1 seed) |")
  assert goal.endswith("| no | mask | 13 (-1 †) | — |")  # the best knob's PSNR cost; no prior


def test_the_k16384_goal_is_costed_against_reg_vq_at_the_same_k():
  # The best K = 16,384 row is measured against the paper's Reg-VQ at K = 16,384, not
  # against the K = 1,024 mask rung (whose PSNR 20 would give a Δ of -8).
  results = _results({"mask": [0.59, 0.60, 0.61], "regvq_k16384": [0.20],
                      "regvq_k16384_tau0.25": [0.40]})
  for name, psnr in (("mask_s0", 19.9), ("mask_s1", 20.0), ("mask_s2", 20.1),
                     ("regvq_k16384_s0", 13.5), ("regvq_k16384_tau0.25_s0", 12.0)):
    results["rows"][name]["stages"]["tokenizer"]["metrics"]["psnr"] = psnr
  lines = regvq_study._verdict(results).splitlines()
  goal = next(line for line in lines if "K = 16,384 in use (Reg-VQ family)" in line)
  # One seed a side: no spread to judge against, so no †.
  assert goal == ("| ≥ 90 % of K = 16,384 in use (Reg-VQ family) | regvq_k16384_tau0.25 | "
                  "40 (1 seed) | no | regvq_k16384 | 12 (-1.5) | — |")
  # FQ is not of the family: it tops the "any quantizer" line and leaves the family's alone.
  results["rows"]["fq_k16384_s0"] = copy.deepcopy(results["rows"]["regvq_k16384_s0"])
  results["rows"]["fq_k16384_s0"]["name"] = "fq_k16384_s0"
  results["rows"]["fq_k16384_s0"]["stages"]["tokenizer"]["metrics"].update(usage=0.7,
                                                                          psnr=15.0)
  lines = regvq_study._verdict(results).splitlines()
  assert next(line for line in lines if "(Reg-VQ family)" in line and "16,384" in line) == goal
  assert next(line for line in lines if "K = 16,384 in use (any quantizer)" in line) == (
      "| ≥ 90 % of K = 16,384 in use (any quantizer) | fq_k16384 | 70 (1 seed) | no | "
      "regvq_k16384 | 15 (+1.5) | — |")
