# Training: weakly supervised pretraining, then R fine-tuning runs (different seeds and
# data orders) with mined hard negatives, then a uniform soup of the runs.
# Resumable state goes to work/checkpoints/, outside the declared outputs: Snakemake deletes a
# rule's outputs before re-running it, so a killed training job resumes from there.
# Each job writes the model, per-step metrics (loss and its terms, lr, samples/s, tokens/s) and a
# stats JSON (records in/kept, records short of negatives and what was done with them).


def train_args(stage):
    c = config[stage]
    args = (f"--batch-size {c['batch_size']} --lr {c['lr']} --temperature {c['temperature']} "
            f"--epochs {c['epochs']} --warmup-ratio {c['warmup_ratio']} --max-seq-length {config['max_seq_length']}"
            + pooling_arg())
    if c.get("max_steps"):
        args += f" --max-steps {c['max_steps']}"
    if c.get("checkpoint_every"):
        args += f" --checkpoint-every {c['checkpoint_every']}"
    if c.get("matryoshka"):
        args += " --matryoshka-dims " + " ".join(map(str, c["matryoshka"]["dims"]))
        args += " --matryoshka-weights " + " ".join(map(str, c["matryoshka"]["weights"]))
    if stage == "finetune":
        args += f" --group-size {c['group_size']}"
        args += f" --focal-gamma {c.get('focal_gamma', 0.0)} --mix-negatives {c.get('mix_negatives', 0)}"
    # Batching, negatives and memory options: only the keys the config sets reach the command (the
    # trainer's defaults are the old behaviour), so existing configs keep their command lines.
    for key in ("homogeneous_ratio", "few_negatives", "precision", "mini_batch_size", "weight_decay", "save_dtype"):
        if key in c:
            args += f" --{key.replace('_', '-')} {c[key]}"
    if c.get("gradient_checkpointing"):
        args += " --gradient-checkpointing"
    last_k = config["soup"].get("last_k", 1)
    if stage == "finetune" and last_k > 1:
        # the soup's last-k ingredients: the final model and the k-1 snapshots kept before it
        every = c.get("snapshot_every") or c.get("checkpoint_every")
        if not every:
            raise ValueError("config: soup.last_k > 1 needs finetune.snapshot_every (steps between the snapshots the soup averages)")
        args += f" --keep-snapshots {last_k - 1} --snapshot-every {every}"
    return args


def in_batch_arg(stage):
    """`--in-batch-negatives` for the tasks whose config sets `in_batch_negatives: false` (their queries
    see only their own hard negatives; FlagEmbedding's no_in_batch_neg), or nothing."""
    off = {t: False for t, spec in sorted(config["data"][stage].items()) if spec.get("in_batch_negatives") is False}
    return f" --in-batch-negatives {shlex.quote(json.dumps(off))}" if off else ""


rule pretrain:
    input:
        # the Parquet parts of the decontaminated pretraining data (the trainer memory-maps them)
        data=stage_data("pretrain"),
    output:
        model=directory("models/pretrain"),
        metrics="models/pretrain.metrics.jsonl",
        stats="models/pretrain.stats.json",
    params:
        model=config["base_model"],
        args=train_args("pretrain"),
        symmetric=shlex.quote(symmetric_json("pretrain")),
        seed=config["seed"],
    threads: config["threads"]
    log:
        "logs/train/pretrain.log",
    benchmark:
        "benchmarks/train/pretrain.tsv"
    resources:
        mem_mb=16000,
        **gpu_resources("pretrain"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} --nodes {resources.nodes} --torchrun -- "
        "{KALM} train --stage pretrain --model {params.model} --data {input.data} --out {output.model} "
        "--metrics {output.metrics} --stats {output.stats} --symmetric {params.symmetric} {params.args} "
        "--seed {params.seed} "
        "--checkpoint-dir work/checkpoints/pretrain "
        "--threads {threads} > {log} 2>&1"


rule finetune:
    input:
        data=mined_parts(),  # the Parquet parts of the mined fine-tuning data
        start=["models/pretrain"] if config["pretrain"]["enabled"] else [],
    output:
        model=directory("models/finetune/run{run}"),
        metrics="models/finetune/run{run}.metrics.jsonl",
        stats="models/finetune/run{run}.stats.json",
    params:
        model=finetune_start(),
        args=train_args("finetune"),
        symmetric=shlex.quote(symmetric_json("finetune")),
        in_batch=in_batch_arg("finetune"),
        seed=lambda w: config["seed"] + 1000 * (int(w.run) + 1),
    threads: config["threads"]
    log:
        "logs/train/finetune_run{run}.log",
    benchmark:
        "benchmarks/train/finetune_run{run}.tsv"
    resources:
        mem_mb=16000,
        **gpu_resources("finetune"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} --nodes {resources.nodes} --torchrun -- "
        "{KALM} train --stage finetune --model {params.model} --data {input.data} --out {output.model} "
        "--metrics {output.metrics} --stats {output.stats} --symmetric {params.symmetric} {params.args} "
        "--seed {params.seed}{params.in_batch} "
        "--checkpoint-dir work/checkpoints/finetune_run{wildcards.run} "
        "--threads {threads} > {log} 2>&1"


def soup_snapshot_dirs():
    """The snapshot folders of the fine-tune runs (kalm.soup.snapshot_dir of each run's --checkpoint-dir)."""
    return [f"work/checkpoints/finetune_run{r}/snapshots" for r in FINETUNE_RUNS]


def soup_args():
    c = config["soup"]
    args = f"--method {c['method']}"
    if c.get("weights"):
        args += " --weights " + " ".join(map(str, c["weights"]))
    if c.get("dev_task"):
        spec = eval_task_spec(config["eval"]["tasks"][c["dev_task"]].get("lang", "en"), c["dev_task"])
        args += " --dev-task-json " + shlex.quote(json.dumps(spec, ensure_ascii=False))
    if c.get("temperature"):
        args += f" --temperature {c['temperature']}"
    if c.get("last_k", 1) > 1:
        # the last k checkpoints of each run: its final model and the k-1 snapshots the trainer kept
        # beside its resumable checkpoint (not Snakemake outputs: their manifest ties them to the run)
        args += f" --last-k {c['last_k']} --snapshots " + " ".join(soup_snapshot_dirs())
    return args


rule soup:
    input:
        models=expand("models/finetune/run{run}", run=FINETUNE_RUNS),
        dev=[config["eval"]["tasks"][config["soup"]["dev_task"]]["path"]] if config["soup"].get("dev_task") else [],
    output:
        model=directory("models/soup"),
        report="models/soup.report.json",
    params:
        args=soup_args(),
    log:
        "logs/soup/soup.log",
    benchmark:
        "benchmarks/soup/soup.tsv"
    resources:
        mem_mb=8000,
    shell:
        "{KALM} soup {input.models} --out {output.model} --report {output.report} {params.args} > {log} 2>&1"
