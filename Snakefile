# BioVFM-Scale: download -> preprocess -> pretrain (one job per grid point) -> evaluate -> aggregate.
# Parameters: params.yaml (validated below). Run: snakemake --cores all
from biovfm.config import validate_params


configfile: "params.yaml"


config = validate_params(config, source="params.yaml (+ --config/--configfile overrides)")


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/export.smk"  # opt-in target: snakemake --cores all export


rule all:
    default_target: True
    input:
        AGGREGATE_OUTPUTS,
