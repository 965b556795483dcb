import re

import pytest

from biovfm.config import (ParamsError, eval_job, eval_job_from_json, grid_points, load_params, pretrain_job,
                           pretrain_job_from_json, to_json, validate_params)
from biovfm.data.medmnist import MODALITIES
from conftest import REPO


def test_default_params_validate_and_fill_defaults():
    p = load_params(REPO / "params.yaml")
    g = p["grid"]
    assert g["methods"] == ["mae", "dino"]
    product = 2 * len(g["models"]) * len(g["data_sizes"]) * len(g["seeds"]) * len(g["modalities"])
    assert len(list(grid_points(p))) == product + 2 * len(g["extra"])  # each extra: one point per method
    assert p["evaluate"]["probe"]["max_grid_extensions"] >= 1


def test_defaults_filled_for_missing_sections(raw_params):
    del raw_params["evaluate"]
    p = validate_params(raw_params)
    assert p["evaluate"]["probe"]["lr"] == 0.01 and p["evaluate"]["raw_pixels"] is True


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda p: p["pretrain"].update(stepz=3), "pretrain: unknown key(s) ('stepz' was unexpected)"),
        (lambda p: p["pretrain"].update(steps="ten"), "pretrain.steps: 'ten' is not of type 'integer'"),
        (lambda p: p["grid"]["models"].append("giant"), "grid.models: 'giant' has no definition under models"),
        (lambda p: p["grid"]["modalities"].append("mri"), "grid.modalities: 'mri' has no definition"),
        (lambda p: p["models"]["femto"].update(patch_size=5), "models.femto.patch_size=5 does not divide data.image_size=16"),
        (lambda p: p["grid"]["data_sizes"].append(10_000), "grid.data_sizes: 10000 exceeds data.synthetic.corpus_size"),
        (lambda p: p["grid"].update(methods=["simclr"]), "grid.methods[0]: 'simclr' is not one of"),
        (lambda p: p["methods"]["dino"].update(pretrain={"lr": 1}), "methods.dino.pretrain: unknown key(s) ('lr' was unexpected)"),
        (lambda p: p["methods"]["dino"].update(pretrain={"grad_accum": 5}), "dino: batch_size=32 is not divisible by grad_accum=5"),
        (lambda p: p["models"]["femto"].update(patch_size={224: 16}), "no patch size for data.image_size=16 (given for 224)"),
        (lambda p: p["methods"]["dino"].update(centering="none"), "methods.dino.centering: 'none' is not one of"),
        (lambda p: (p.update(modalities={"xray": ["xray"]}), p["grid"].update(modalities=["xray"])),
         "grid.data_sizes: 60 images of modality mix 'xray' need a larger corpus (about 20 of"),
    ],
)
def test_bad_params_name_the_key(raw_params, edit, needle):
    edit(raw_params)
    with pytest.raises(ParamsError) as e:
        validate_params(raw_params, source="my.yaml")
    assert "my.yaml" in str(e.value) and needle in str(e.value)


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)


def test_job_json_roundtrip(params):
    job = pretrain_job(params, "mae", "atto", "all", 60, 0, "abc")
    assert pretrain_job_from_json(to_json(job)) == job
    assert job.run_id == "mae/atto/all/n60/s0"
    ej = eval_job(params, "random_init", "random/atto/s0", "atto", 0, {"method": "random"})
    assert eval_job_from_json(to_json(ej)) == ej


def test_method_overrides_and_patch_size_by_image_size(raw_params):
    raw_params["methods"]["dino"]["pretrain"] = {"base_lr": 0.5, "clip_grad": 3.0}
    raw_params["models"]["femto"]["patch_size"] = {16: 8, 224: 16}
    p = validate_params(raw_params)
    dino, mae = pretrain_job(p, "dino", "femto", "all", 60, 0), pretrain_job(p, "mae", "femto", "all", 60, 0)
    assert dino.train.base_lr == 0.5 and dino.train.clip_grad == 3.0 and dino.train.steps == mae.train.steps
    assert mae.train.base_lr == 2.0e-3 and mae.train.clip_grad == 0.0
    assert "pretrain" not in dino.method_cfg and dino.model.patch_size == 8
    assert pretrain_job_from_json(to_json(dino)) == dino


def test_cluster_resources_by_rule_and_model_size(raw_params):
    from biovfm.config import cluster_resources

    p = validate_params(raw_params)  # no cluster section: the schema's defaults
    assert cluster_resources(p, "evaluate_raw_pixels") == {"slurm_account": None, "slurm_partition": None,
                                                           "mem_mb": 4000, "runtime": 60}
    assert cluster_resources(p, "evaluate", "femto") == cluster_resources(p, "evaluate_random_init", "femto") == {
        "slurm_account": None, "slurm_partition": None, "mem_mb": 16000, "runtime": 120, "gpu": 1, "gpu_model": None,
        "cpus_per_gpu": 8}  # evaluation of an encoder can ask for GPUs too (cluster.evaluate)
    assert cluster_resources(p, "pretrain", "femto") == {"slurm_account": None, "slurm_partition": None,
                                                         "mem_mb": 16000, "runtime": 120, "gpu": 1, "gpu_model": None,
                                                         "cpus_per_gpu": 8}
    raw_params["cluster"] = {"account": "lab", "cpu_partition": "cpu", "gpu_partition": "gpu", "gpu_model": "h100",
                             "cpu_jobs": {"runtime": 30}, "rules": {"preprocess_corpus": {"mem_mb": 32000}},
                             "pretrain": {"default": {"gpus": 0}, "atto": {"gpus": 4, "runtime": 600}},
                             "evaluate": {"atto": {"gpus": 2, "mem_mb": 64000}}}
    p = validate_params(raw_params)
    assert cluster_resources(p, "preprocess_corpus") == {"slurm_account": "lab", "slurm_partition": "cpu",
                                                         "mem_mb": 32000, "runtime": 30}
    assert cluster_resources(p, "aggregate")["mem_mb"] == 4000
    femto, atto = cluster_resources(p, "pretrain", "femto"), cluster_resources(p, "pretrain", "atto")
    assert femto == {"slurm_account": "lab", "slurm_partition": "cpu", "mem_mb": 16000, "runtime": 120, "gpu": 0,
                     "gpu_model": None, "cpus_per_gpu": None}  # a CPU job: no GPU keys
    assert atto == {"slurm_account": "lab", "slurm_partition": "gpu", "mem_mb": 16000, "runtime": 600, "gpu": 4,
                    "gpu_model": "h100", "cpus_per_gpu": 8}
    assert cluster_resources(p, "evaluate", "atto") == {"slurm_account": "lab", "slurm_partition": "gpu",
                                                        "mem_mb": 64000, "runtime": 120, "gpu": 2, "gpu_model": "h100",
                                                        "cpus_per_gpu": 8}
    raw_params["cluster"]["evaluate"] = {"giant": {"gpus": 1}}
    with pytest.raises(ParamsError, match="cluster.evaluate: giant not a model size"):
        cluster_resources(validate_params(raw_params), "evaluate", "atto")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(gpu_model="'h100'"), "cluster.gpu_model"),
    (lambda c: c.update(cpu_jobs={"mem": 100}), "cluster.cpu_jobs: unknown key(s) ('mem' was unexpected)"),
    (lambda c: c.update(pretrain={"default": {"gpus": -1}}), "cluster.pretrain.default.gpus"),
])
def test_bad_cluster_params_name_the_key(raw_params, edit, needle):
    raw_params["cluster"] = {}
    edit(raw_params["cluster"])
    with pytest.raises(ParamsError, match=re.escape(needle)):
        validate_params(raw_params)


def test_cluster_pretrain_sizes_must_be_models(raw_params):
    from biovfm.config import cluster_resources

    raw_params["cluster"] = {"pretrain": {"gigantic": {"gpus": 8}}}
    with pytest.raises(ParamsError, match="cluster.pretrain: gigantic not a model size under models"):
        cluster_resources(validate_params(raw_params), "pretrain", "femto")


# ----------------------------------------------------------------------------- grid.extra
def test_extra_sub_grids_add_their_points_once(raw_params) -> None:
    from biovfm.config import grid_points, grid_values

    raw_params["grid"]["extra"] = [{"models": ["femto"], "modalities": ["xray"], "data_sizes": [20]},
                                   {"models": ["femto"], "data_sizes": [60]}]  # the second repeats main points
    raw_params["modalities"] = {"all": list(MODALITIES), "xray": ["xray"]}
    p = validate_params(raw_params)
    g = raw_params["grid"]
    main = len(g["methods"]) * len(g["models"]) * len(g["data_sizes"]) * len(g["modalities"]) * len(g["seeds"])
    points = list(grid_points(p))
    assert len(points) == main + len(g["methods"])  # only the xray points are new
    assert {q["modality"] for q in points} == {"all", "xray"}
    assert grid_values(p, "modalities") == ["all", "xray"]


def test_extra_sub_grids_are_validated_with_their_position(raw_params) -> None:
    raw_params["grid"]["extra"] = [{"models": ["giant"]}]
    with pytest.raises(ParamsError, match=r"grid.extra\[0\].*'giant' has no definition"):
        validate_params(raw_params)
    raw_params["grid"]["extra"] = [{"modalities": ["xray"], "data_sizes": [180]}]
    raw_params["modalities"] = {"all": list(MODALITIES), "xray": ["xray"]}
    with pytest.raises(ParamsError, match="180 images of modality mix 'xray' need a larger corpus"):
        validate_params(raw_params)
