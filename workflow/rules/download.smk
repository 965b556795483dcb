# The download stage, the only one that touches the network. data.source picks the rule.
from biovfm.data.download import expected_md5
from biovfm.data.medmnist import TASKS as MEDMNIST_FLAGS, size_suffix

if SOURCE == "synthetic":

    rule download:
        conda:
            CONDA_ENV
        output:
            tasks=expand(f"{RAW}/{{task}}.npz", task=TASKS),
            corpus=f"{RAW}/corpus.npz",
            manifest=f"{RAW}/manifest.json",
        params:
            spec=json.dumps(
                dict(
                    tasks=TASKS,
                    **{k: config["data"]["synthetic"][k] for k in ("n_train", "n_val", "n_test", "size", "corpus_size", "seed")},
                ),
                sort_keys=True,
            ),
            out=subpath(output.manifest, parent=True),
            code=CODE_DOWNLOAD,  # a changed generator is a new benchmark
        resources:
            **cfg.cluster_resources(config, "download"),  # SLURM only: partition, account, mem_mb, runtime
        log:
            "results/logs/download.log",
        message:
            "Generating the embedded synthetic benchmark"
        shell:
            "biovfm download --spec {params.spec:q} --out {params.out:q} 2>&1 | tee {log:q}"

else:

    localrules:
        download,  # on a cluster, fetch on the submit host: compute nodes often have no internet

    rule download:
        conda:
            CONDA_ENV
        # One job per file: Snakemake deletes the outputs of a failed job, so one bad file never costs the
        # verified ones, and the <file>.part (not an output) survives for the next run to resume from.
        # The mirror and retry settings reach the command as resources, not params: a changed param reruns a job
        # (deleting its output first), and a new mirror must not re-download verified files.
        # Only the MD5 decides the content, so it is the one param. Cap parallel downloads: --resources network=2
        output:
            f"{RAW}/{{task}}{size_suffix(MEDMNIST_SIZE)}.npz",
        wildcard_constraints:
            task="|".join(MEDMNIST_FLAGS),  # any of the 12 files, so other stages (the corpus) may ask for them too
        params:
            md5=lambda w: f"{npz_name(w.task, MEDMNIST_SIZE)}={expected_md5(w.task, MEDMNIST_SIZE, config['data']['medmnist']['md5'])}",
            size=MEDMNIST_SIZE,
            out=subpath(output[0], parent=True),
        resources:
            network=1,
            mirror=config["data"]["medmnist"]["base_url"],
            retries=config["data"]["medmnist"]["retries"],
            timeout=str(config["data"]["medmnist"]["timeout"]),
            backoff=str(config["data"]["medmnist"]["backoff"]),
        log:
            "results/logs/download/{task}.log",
        message:
            "Downloading MedMNIST+ {wildcards.task} at {params.size}px (resumable, MD5-checked)"
        shell:
            "biovfm download-medmnist --flags {wildcards.task:q} --size {params.size} --md5 {params.md5:q} "
            "--base-url {resources.mirror:q} --retries {resources.retries} --timeout {resources.timeout} "
            "--backoff {resources.backoff} "
            "--out {params.out:q} 2>&1 | tee {log:q}"
