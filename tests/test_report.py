"""The report (ant_dist.report) against hand-built metrics.json files: its numbers are recomputed
here with numpy from the files, its significance marks with scipy.stats.ttest_rel."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from ant_dist.eval.report import main, paired_ttest

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50")
N_USERS = 150


def base_values(rng, n=N_USERS):
    """Per-user values of a weak model: hits with rising probability in K, NDCG below recall."""
    out = {}
    for k, p in ((10, 0.25), (20, 0.35), (50, 0.5)):
        hit = rng.binomial(1, p, n).astype(float)
        out[f"recall@{k}"] = hit
        out[f"ndcg@{k}"] = hit * rng.uniform(0.2, 1.0, n)
    return out


def improve(values, rng, frac):
    """Turn a fraction `frac` of the misses into hits (a clearly better model when frac is large)."""
    out = {}
    for m, v in values.items():
        flip = (v == 0) & (rng.random(v.size) < frac)
        out[m] = np.where(flip, 0.5 if m.startswith("ndcg") else 1.0, v)
    return out


def spoil(values, n_users):
    """Turn the first `n_users` hits into misses (slightly worse, not significantly)."""
    out = {}
    for m, v in values.items():
        w = v.copy()
        w[np.flatnonzero(w)[:n_users]] = 0.0
        out[m] = w
    return out


def write_run(root, name, method, domain, values, user_ids, seed=0, pretrain_seed=0, fraction=1.0, **override):
    """A metrics.json in the documented format; `values` are per user in the order of `user_ids`."""
    ids = [int(u) for u in user_ids]
    block = {"users": len(ids), "user_ids": ids, "mean": {m: float(np.mean(v)) for m, v in values.items()},
             "per_user": {m: [float(x) for x in v] for m, v in values.items()}}
    top = block["mean"]["recall@10"]
    data = {"format": "ant-dist-metrics/1", "run_name": name, "method": method, "mode": "relearn",
            "item_repr": "irl", "ablations": [], "seed": seed, "pretrain_seed": pretrain_seed,
            "pretrained": None, "train_users_fraction": fraction, "domains": [domain],
            "select_metric": "recall@10", "best": {"step": 30, "epoch": 3, "value": top},
            "epochs": 3, "steps": 30, "wall_s": 1.0, "valid": {domain: block}, "test": {domain: block},
            "curve": [{"step": 10 * e, "epoch": e,
                       "valid": {domain: {m: top * e / 3 for m in values}}} for e in (1, 2, 3)],
            "config": {}}
    data.update(override)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Scientific: GB, FT (slightly worse), ReL (clearly better, 2 seeds), ID-SASRec (weak).
    Office: GB and ReL (slightly better, users written in shuffled order)."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(7)
    ids = np.arange(N_USERS) + 1000
    gb = base_values(rng)
    write_run(root, "Sci-GB", "GB", "Scientific", gb, ids)
    write_run(root, "Sci-FT", "FT", "Scientific", spoil(gb, 2), ids)
    for seed in (0, 1):
        write_run(root, f"Sci-ReL-s{seed}", "ReL", "Scientific", improve(gb, rng, 0.4), ids, seed=seed)
    write_run(root, "Sci-ID", "ID-SASRec", "Scientific", spoil(gb, 20), ids, pretrain_seed=None)
    gb_office = base_values(rng)
    write_run(root / "office", "Off-GB", "GB", "Office", gb_office, ids)
    perm = rng.permutation(N_USERS)
    rel_office = {m: v[perm] for m, v in improve(gb_office, rng, 0.03).items()}
    write_run(root / "office", "Off-ReL", "ReL", "Office", rel_office, ids[perm])
    return root


def per_user_by_id(folder, domain, metric):
    block = json.loads((folder / "metrics.json").read_text())["test"][domain]
    return dict(zip(block["user_ids"], block["per_user"][metric], strict=True))


def group_values(root, names, domain, metric):
    """(user ids sorted, per-user values averaged over the runs, the runs' means) from the files."""
    maps = [per_user_by_id(root / n, domain, metric) for n in names]
    users = sorted(maps[0])
    per_user = np.mean([[m[u] for u in users] for m in maps], axis=0)
    means = np.array([np.mean(list(m.values())) for m in maps])
    return users, per_user, means


SCI = {"GB": ["Sci-GB"], "FT": ["Sci-FT"], "ReL": ["Sci-ReL-s0", "Sci-ReL-s1"], "ID-SASRec": ["Sci-ID"]}
OFF = {"GB": ["office/Off-GB"], "ReL": ["office/Off-ReL"]}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main([str(runs), "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def table_of(rep, domain):
    return next(t for t in rep["tables"] if t["domain"] == domain)


def md_rows(md, heading):
    """{method: [cells]} of the first table after a heading of report.md."""
    lines = md.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(ln)
    out = {}
    for ln in rows[2:]:
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        out[cells[0]] = cells[1:]
    return out


@pytest.mark.parametrize("domain,groups", [("Scientific", SCI), ("Office", OFF)])
def test_table_numbers_equal_the_files(runs, report, domain, groups):
    _, rep, md = report
    table = table_of(rep, domain)
    assert [r["method"] for r in table["rows"]] == [m for m in ("ID-SASRec", "GB", "FT", "ReL") if m in groups]
    cells = md_rows(md, domain)
    for row in table["rows"]:
        for j, metric in enumerate(METRICS):
            _, _, means = group_values(runs, groups[row["method"]], domain, metric)
            assert row["mean"][metric] == pytest.approx(means.mean(), rel=1e-9)
            if len(means) > 1:
                assert row["std"][metric] == pytest.approx(np.std(means, ddof=1), rel=1e-9)
                text = f"{means.mean():.4f} ± {np.std(means, ddof=1):.4f}"
            else:
                assert row["std"][metric] is None
                text = f"{means.mean():.4f}"
            assert text in cells[row["method"]][j]


@pytest.mark.parametrize("domain,groups", [("Scientific", SCI), ("Office", OFF)])
def test_bold_and_marks_match_scipy(runs, report, domain, groups):
    _, rep, md = report
    table, cells = table_of(rep, domain), md_rows(md, domain)
    for j, metric in enumerate(METRICS):
        values = {m: group_values(runs, names, domain, metric) for m, names in groups.items()}
        ranked = sorted(values, key=lambda m: values[m][2].mean(), reverse=True)
        best, runner_up = ranked[0], ranked[1]
        p = stats.ttest_rel(values[best][1], values[runner_up][1]).pvalue
        col = table["columns"][metric]
        assert col["best"] == [best] and col["runner_up"] == runner_up
        assert col["p_value"] == pytest.approx(p, rel=1e-9)
        assert col["significant"] == (p < 0.05)
        for method, row_cells in cells.items():
            if method == best:
                assert row_cells[j].startswith("**") and row_cells[j].endswith("**\\*" if p < 0.05 else "**")
            else:
                assert "**" not in row_cells[j]
    # the data were built so that both outcomes occur: ReL clearly wins Scientific, barely wins Office
    assert table_of(rep, "Scientific")["columns"]["recall@10"]["significant"] is True
    assert table_of(rep, "Office")["columns"]["recall@10"]["significant"] is False


def test_negative_transfer_table(runs, report):
    _, rep, md = report
    nt = {t["domain"]: t for t in rep["negative_transfer"]}
    assert set(nt) == {"Scientific", "Office"} and nt["Scientific"]["methods"] == ["FT", "ReL"]
    for domain, groups in (("Scientific", SCI), ("Office", OFF)):
        rows = {r["metric"]: r for r in nt[domain]["rows"]}
        assert list(rows) == ["recall@10", "ndcg@10"]
        for metric, row in rows.items():
            _, gb_values, gb_means = group_values(runs, groups["GB"], domain, metric)
            for method in nt[domain]["methods"]:
                _, values, means = group_values(runs, groups[method], domain, metric)
                r = row["methods"][method]
                expected = (means.mean() - gb_means.mean()) / gb_means.mean() * 100
                assert r["rel_change_pct"] == pytest.approx(expected, rel=1e-9)
                p = stats.ttest_rel(values, gb_values).pvalue
                assert r["p_value"] == pytest.approx(p, rel=1e-9) and r["significant"] == (p < 0.05)
                # negative transfer: worse than GB AND significantly so
                assert r["negative_transfer"] == (means.mean() < gb_means.mean() and p < 0.05)
    ft = nt["Scientific"]["rows"][0]["methods"]["FT"]
    assert ft["rel_change_pct"] < 0 and not ft["significant"]  # slightly worse, p well above 0.05
    assert not ft["negative_transfer"] and ft["outcome"] == "n.s."
    rel = nt["Scientific"]["rows"][0]["methods"]["ReL"]
    assert rel["significant"] and rel["outcome"] == "positive transfer"
    assert nt["Office"]["rows"][0]["methods"]["ReL"]["outcome"] == "n.s."  # slightly better, not significant
    section = md.split("## Negative transfer", 1)[1]
    sci_line = next(ln for ln in section.splitlines() if ln.startswith("| Scientific | Recall@10"))
    assert f"{ft['rel_change_pct']:+.2f}% n.s." in sci_line and f"{rel['rel_change_pct']:+.2f}%\\*" in sci_line
    assert "negative transfer" not in sci_line and "below GB, n.s.: FT" in sci_line
    off_line = next(ln for ln in section.splitlines() if ln.startswith("| Office | Recall@10"))
    assert "negative transfer" not in off_line and "% n.s." in off_line


def test_plots_and_run_list(runs, report):
    out, rep, md = report
    files = {p["file"] for p in rep["plots"]}
    assert files == {"curve_Scientific.png", "bars_Scientific.png", "curve_Office.png", "bars_Office.png"}
    for name in files:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG"
        assert f"]({name})" in md
    assert len(rep["runs"]) == 7 and all(r["run_name"] in md for r in rep["runs"])


def test_paired_ttest_aligns_users_like_scipy():
    rng = np.random.default_rng(1)
    a_ids, b_ids = np.arange(0, 40), np.arange(10, 50)  # 30 users in common
    a, b = rng.random(40), rng.random(40)
    res = paired_ttest(a_ids, a, b_ids, b)
    assert res["n"] == 30
    assert res["p"] == pytest.approx(stats.ttest_rel(a[10:], b[:30]).pvalue, rel=1e-12)
    assert paired_ttest(a_ids, a, a_ids, a)["p"] is None  # no difference at all: undefined, never a mark


def test_methods_on_different_users_are_paired_on_the_common_ones(tmp_path):
    rng = np.random.default_rng(3)
    gb, rel = base_values(rng, 100), base_values(rng, 100)
    write_run(tmp_path / "runs", "GB", "GB", "Sci", gb, np.arange(100))
    write_run(tmp_path / "runs", "ReL", "ReL", "Sci", rel, np.arange(40, 140))  # users 40..99 in common
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--metrics", "recall@10,ndcg@10"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    rel_row = rep["negative_transfer"][0]["rows"][1]["methods"]["ReL"]
    assert rel_row["n_paired_users"] == 60
    p = stats.ttest_rel(rel["ndcg@10"][:60], gb["ndcg@10"][40:]).pvalue
    assert rel_row["p_value"] == pytest.approx(p, rel=1e-9)
    assert "on the 60 users both evaluated" in (tmp_path / "out" / "report.md").read_text()


def test_metrics_option_limits_columns(runs, tmp_path):
    assert main([str(runs / "Sci-GB"), str(runs / "Sci-FT"), "--out", str(tmp_path), "--metrics", "ndcg@10"]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert list(rep["tables"][0]["columns"]) == ["ndcg@10"]
    assert [r["metric"] for r in rep["negative_transfer"][0]["rows"]] == ["ndcg@10"]


def _refused(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_refusals(tmp_path, capsys):
    ids = np.arange(20)
    vals = {m: np.linspace(0, 1, 20) for m in METRICS}
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    _refused(capsys, [str(tmp_path / "empty"), "--out", out], ["no metrics.json"])
    _refused(capsys, [str(tmp_path / "nowhere"), "--out", out], ["no such file"])
    bad = tmp_path / "bad"
    write_run(bad, "broken", "GB", "Sci", vals, ids)
    (bad / "broken" / "metrics.json").write_text("{not json")
    _refused(capsys, [str(bad), "--out", out], ["not readable JSON"])
    write_run(tmp_path / "fmt", "r", "GB", "Sci", vals, ids, format="other/1")
    _refused(capsys, [str(tmp_path / "fmt"), "--out", out], ["format"])
    write_run(tmp_path / "short", "r", "GB", "Sci", {**vals, "ndcg@10": vals["ndcg@10"][:5]}, ids)
    _refused(capsys, [str(tmp_path / "short"), "--out", out], ["per_user['ndcg@10']"])
    write_run(tmp_path / "nokey", "r", "GB", "Sci", vals, ids, test={})
    _refused(capsys, [str(tmp_path / "nokey"), "--out", out], ["missing key", "Sci"])
    write_run(tmp_path / "users", "a", "ReL", "Sci", vals, ids, seed=0)
    write_run(tmp_path / "users", "b", "ReL", "Sci", vals, ids + 5, seed=1)
    _refused(capsys, [str(tmp_path / "users"), "--out", out], ["different users", "ReL on Sci"])
    write_run(tmp_path / "dup", "a", "ReL", "Sci", vals, ids)
    write_run(tmp_path / "dup", "b", "ReL", "Sci", vals, ids)
    _refused(capsys, [str(tmp_path / "dup"), "--out", out], ["pass one of them"])
    write_run(tmp_path / "ok", "a", "GB", "Sci", vals, ids)
    _refused(capsys, [str(tmp_path / "ok"), "--out", out, "--metrics", "recall@100"], ["'recall@100'"])
    _refused(capsys, [str(tmp_path / "ok"), "--out", out, "--metrics", "mrr"], ["--metrics"])
    _refused(capsys, [str(tmp_path / "ok"), "--out", out, "--alpha", "1.5"], ["--alpha"])
    assert not (tmp_path / "out" / "report.md").exists()


def test_help_and_missing_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- the paper's Tables II and III
def hits(n_hit, n=N_USERS):
    """Per-user values with exactly `n_hit` hits (the first users): recall mean n_hit / n, NDCG half of it."""
    hit = (np.arange(n) < n_hit).astype(float)
    return {m: hit * (0.5 if m.startswith("ndcg") else 1.0) for m in METRICS}


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory):
    """Arts: ReL clearly beats SASRec (then S3-Rec, ID-SASRec) of Table II; GB clearly beats ReL
    (significant negative transfer), FT is two hits below GB (not significant); a ReL run on half of the
    users, much better, that Tables II/III must ignore, as they must ignore Zoo (half of the users only). Sci: SASRec beats ReL by two hits (not significant),
    GB is one hit below ReL; UniSRec-GB 30 hits, UniSRec-ReL 33 (+10 %); labels outside every list."""
    root = tmp_path_factory.mktemp("paper_runs")
    rng = np.random.default_rng(11)
    ids = np.arange(N_USERS)
    arts, sci = base_values(rng), base_values(rng)
    arts_gb = improve(arts, rng, 0.5)
    for name, method, values in (("ReL", "ReL", arts), ("SASRec", "SASRec", spoil(arts, 20)),
                                 ("S3-Rec", "S3-Rec", spoil(arts, 25)), ("ID", "ID-SASRec", spoil(arts, 30)),
                                 ("GB", "GB", arts_gb), ("FT", "FT", spoil(arts_gb, 2))):
        write_run(root, f"Arts-{name}", method, "Arts", values, ids)
    write_run(root, "Arts-ReL-half", "ReL", "Arts", improve(arts, rng, 0.9), ids, fraction=0.5)
    for method in ("SASRec", "GB", "ReL"):  # a target with runs on half of its users only: in no paper table
        write_run(root, f"Zoo-{method}-half", method, "Zoo", base_values(rng), ids, fraction=0.5)
    for name, method, values in (("SASRec", "SASRec", sci), ("ReL", "ReL", spoil(sci, 2)),
                                 ("ID", "ID-SASRec", spoil(sci, 30)), ("GB", "GB", spoil(sci, 3)),
                                 ("UGB", "UniSRec-GB", hits(30)), ("UReL", "UniSRec-ReL", hits(33)),
                                 ("BPR", "BPR", spoil(sci, 40)), ("Another", "Another", spoil(sci, 41)),
                                 ("ReL-T", "ReL -T", spoil(sci, 42))):
        write_run(root, f"Sci-{name}", method, "Sci", values, ids)
    return root


@pytest.fixture(scope="module")
def paper_report(paper_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_report")
    assert main([str(paper_runs), "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def label(metric):
    return metric.replace("recall", "Recall").replace("ndcg", "NDCG")


def first_table(text):
    """The rows of the first markdown table in `text`, header included, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    return rows


def md_section(md, heading):
    return md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


TABLE2 = {"Arts": {"SASRec": "Arts-SASRec", "S3-Rec": "Arts-S3-Rec", "ID-SASRec": "Arts-ID", "ReL": "Arts-ReL"},
          "Sci": {"SASRec": "Sci-SASRec", "ID-SASRec": "Sci-ID", "ReL": "Sci-ReL"}}


def test_table2_rows_are_the_paper_methods_in_order(paper_report):
    rep, md = paper_report
    t2 = rep["table2"]
    assert t2["methods"] == ["SASRec", "S3-Rec", "ID-SASRec", "ReL"]  # GB, FT, UniSRec-*, BPR are no Table II rows
    assert [r["name"] for r in t2["rows"]] == ["SASRec", "S3-Rec", "ID-SASRec", "ANT"]
    assert t2["domains"] == ["Arts", "Sci"]
    rel = next(r for r in t2["rows"] if r["method"] == "ReL")
    assert rel["domains"]["Arts"]["runs"] == ["Arts-ReL"]  # the run on half of the users is not in Table II
    rows = first_table(md_section(md, "Table II:").split("### Recall@10\n", 1)[1])
    assert rows[0] == ["Method", "Arts", "Sci"]
    assert [r[0] for r in rows[2:]] == ["SASRec", "S3-Rec", "ID-SASRec", "ANT"]
    assert rows[3][2] == "–"  # S3-Rec has no Sci run


def test_table2_bold_and_marks_match_scipy(paper_runs, paper_report):
    rep, md = paper_report
    t2 = rep["table2"]
    names = {"ReL": "ANT"}
    outcomes = set()
    for metric in METRICS:
        rows = {r[0]: r[1:] for r in first_table(md_section(md, "Table II:").split(f"### {label(metric)}\n", 1)[1])[2:]}
        for j, domain in enumerate(("Arts", "Sci")):
            values = {m: group_values(paper_runs, [run], domain, metric) for m, run in TABLE2[domain].items()}
            ranked = sorted(values, key=lambda m: values[m][2].mean(), reverse=True)
            best, runner_up = ranked[0], ranked[1]
            p = stats.ttest_rel(values[best][1], values[runner_up][1]).pvalue
            col = t2["columns"][domain][metric]
            assert col["best"] == [best] and col["runner_up"] == runner_up
            assert col["p_value"] == pytest.approx(p, rel=1e-9) and col["significant"] == (p < 0.05)
            outcomes.add((domain, p < 0.05))
            for method in TABLE2[domain]:
                cell = rows[names.get(method, method)][j]
                assert cell == (f"**{values[method][2].mean():.4f}**" + ("\\*" if p < 0.05 else "")
                                if method == best else f"{values[method][2].mean():.4f}")
    assert outcomes == {("Arts", True), ("Sci", False)}  # ANT wins Arts significantly, SASRec wins Sci barely


def test_baseline_labels_sort_in_the_section_tables(paper_report):
    rep, _ = paper_report
    order = {t["domain"]: [r["method"] for r in t["rows"]] for t in rep["tables"] if t["train_users_fraction"] == 1}
    assert order["Arts"] == ["SASRec", "S3-Rec", "ID-SASRec", "GB", "FT", "ReL"]
    assert order["Sci"] == ["SASRec", "ID-SASRec", "GB", "ReL", "UniSRec-GB", "UniSRec-ReL", "Another", "BPR",
                            "ReL -T"]


def test_negative_transfer_needs_significance(paper_runs, paper_report):
    rep, md = paper_report
    nt = next(t for t in rep["negative_transfer"] if t["domain"] == "Arts")["rows"][0]["methods"]
    _, gb, _ = group_values(paper_runs, ["Arts-GB"], "Arts", "recall@10")
    p = {m: stats.ttest_rel(group_values(paper_runs, [f"Arts-{m}"], "Arts", "recall@10")[1], gb).pvalue
         for m in ("FT", "ReL")}
    assert p["FT"] > 0.05 and p["ReL"] < 0.05  # how the runs were built
    assert nt["FT"]["rel_change_pct"] < 0 and nt["FT"]["outcome"] == "n.s."
    assert nt["FT"]["negative_transfer"] is False and nt["FT"]["significant"] is False
    assert nt["ReL"]["outcome"] == "negative transfer" and nt["ReL"]["negative_transfer"] is True
    line = next(ln for ln in md_section(md, "Negative transfer").splitlines() if ln.startswith("| Arts | Recall@10"))
    assert line.endswith("| negative transfer: ReL; below GB, n.s.: FT |")
    assert f"{nt['FT']['rel_change_pct']:+.2f}% n.s." in line and f"{nt['ReL']['rel_change_pct']:+.2f}%\\*" in line


def test_table3_changes_vs_the_family_gb(paper_runs, paper_report):
    rep, md = paper_report
    t3 = rep["table3"]
    assert t3["families"] == ["UniSRec", "ANT"] and t3["domains"] == ["Arts", "Sci"]
    rows = {(r["domain"], r["metric"]): r["families"] for r in t3["rows"]}
    assert len(rows) == 2 * len(METRICS)
    # UniSRec on Sci: GB 30 hits, ReL 33 hits of 150 users: +10 % on every metric, p of 3 single-user gains
    p = stats.ttest_rel(hits(33)["recall@10"], hits(30)["recall@10"]).pvalue
    assert p > 0.05
    for metric in METRICS:
        uni = rows[("Sci", metric)]["UniSRec"]
        assert uni["GB"]["value"] == pytest.approx(0.2 if metric.startswith("recall") else 0.1)
        assert uni["ReL"]["rel_change_pct"] == pytest.approx(10.0, rel=1e-9) and uni["FT"] is None
        assert uni["ReL"]["p_value"] == pytest.approx(p, rel=1e-9) and uni["ReL"]["outcome"] == "n.s."
        assert rows[("Arts", metric)]["UniSRec"] == {"GB": None, "FT": None, "ReL": None}
        for domain, role in (("Arts", "FT"), ("Arts", "ReL"), ("Sci", "ReL")):
            _, gb_user, gb_mean = group_values(paper_runs, [f"{domain}-GB"], domain, metric)
            _, user, mean = group_values(paper_runs, [f"{domain}-{role}"], domain, metric)
            cell = rows[(domain, metric)]["ANT"][role]
            assert cell["rel_change_pct"] == pytest.approx((mean[0] - gb_mean[0]) / gb_mean[0] * 100, rel=1e-9)
            assert cell["p_value"] == pytest.approx(stats.ttest_rel(user, gb_user).pvalue, rel=1e-9)
        assert rows[("Arts", metric)]["ANT"]["ReL"]["outcome"] == "negative transfer"
        assert rows[("Sci", metric)]["ANT"]["FT"] is None
    table = first_table(md_section(md, "Table III:"))
    assert table[0] == ["Target", "Metric", "UniSRec GB", "UniSRec FT", "UniSRec ReL", "ANT GB", "ANT FT", "ANT ReL"]
    sci = next(r for r in table if r[:2] == ["Sci", "Recall@10"])
    assert sci[2:5] == ["0.2000", "–", "**0.2200** (+10.00% n.s.)"]
    arts = next(r for r in table if r[:2] == ["Arts", "Recall@10"])
    assert arts[2:5] == ["–", "–", "–"] and arts[5].startswith("**")  # ANT's GB is the best of its family on Arts
    assert arts[7].endswith("%\\*)") and arts[7].split("(")[1].startswith("-")  # significant loss
    assert arts[6].endswith("% n.s.)")


def test_paper_tables_left_out_without_their_runs(tmp_path):
    rng = np.random.default_rng(5)
    ids = np.arange(40)
    write_run(tmp_path / "runs", "GB", "GB", "Sci", base_values(rng, 40), ids)
    write_run(tmp_path / "runs", "ReL", "ReL", "Sci", base_values(rng, 40), ids)
    write_run(tmp_path / "runs", "SASRec-half", "SASRec", "Sci", base_values(rng, 40), ids, fraction=0.5)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    md = (tmp_path / "out" / "report.md").read_text()
    assert rep["table2"] is None and "## Table II:" not in md  # one Table II method (ReL) on all users
    assert rep["table3"]["families"] == ["ANT"] and "## Table III:" in md
    write_run(tmp_path / "runs2", "SASRec", "SASRec", "Sci", base_values(rng, 40), ids)
    write_run(tmp_path / "runs2", "FT", "FT", "Sci", base_values(rng, 40), ids)
    assert main([str(tmp_path / "runs2"), "--out", str(tmp_path / "out2")]) == 0
    rep = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert rep["table3"] is None and "## Table III:" not in (tmp_path / "out2" / "report.md").read_text()  # no GB
    assert rep["table2"] is None  # SASRec alone: FT is no Table II method
