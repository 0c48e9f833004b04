# Sources: a data task with a `source` (a hub dataset at a pinned revision, or a local folder of the same
# layout) instead of a `path` gets one fetch job per file of the source: download (huggingface_hub, cached,
# resumable) and conversion to the input format, row group by row group (kalm/data/fetch.py). The
# converted files are the task's input files: validate reads them like a user's own.


rule fetch:
    output:
        data="corpora/{stage}/{dtask}/{name}.parquet",
        stats="corpora/{stage}/{dtask}/{name}.stats.json",
    log:
        "logs/fetch/{stage}/{dtask}/{name}.log",
    benchmark:
        "benchmarks/fetch/{stage}/{dtask}/{name}.tsv"
    resources:
        mem_mb=2000,  # one row group at a time
    params:
        source=lambda w: shlex.quote(json.dumps(data_task(w.stage, w.dtask)["source"])),
        file=lambda w: shlex.quote(source_file_of(w.stage, w.dtask, w.name)),
    shell:
        "{KALM} fetch --source {params.source} --file {params.file} --task {wildcards.dtask} "
        "--out {output.data} --stats {output.stats} > {log} 2>&1"
