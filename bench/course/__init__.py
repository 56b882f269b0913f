"""The course's tooling, around the benchmarks: each stage's tree exported from its tag
(`stage_trees`), every stage in one run (`python -m bench.course.stages`), two stages side
by side (`bench.course.compare`), where a run's files go (`run_files`), the stage table and plot
(`bench.course.plot_stages`), the chapters' numbers checked against their result files
(`bench.course.chapters`); and the shell helpers: the milestone tags (`make_tags.sh`), the GPU
machine's environment (`gpu_env.sh`, `export_jit_cache.sh`) and one stage's server under
bench.serving (`serve_bench.sh`).
"""
