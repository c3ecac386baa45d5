"""Command-line entry points (`tools/train.py`, `tools/finetune.py`), one job per module.

- `train`: the `tfmeta-train` command line (parse first, then TensorFlow);
- `job`: the training job as named steps (configure, build, resume, fit,
  export, evaluate), registered with gin as `train`;
- `settings`: what a run is configured with, checked, and what a resume may change;
- `rundir`: the output folder: checks before writing, overwrite, clean-up;
- `history`: `history.csv`, cut back atomically on resume;
- `interrupt`: Ctrl-C stops at the next train step with a checkpoint;
- `finetune`: the `tfmeta-finetune` command line and job;
- `ginconfig`: reading gin files and bindings with one-line errors;
- `errors`: bad input as one line naming the fix, exit code 2;
- `startup`: `--verbose`, TensorFlow imported quietly, the tools' CPU kernels;
- `workers`: a tool's independent units run side by side in child processes;
- `report`: the summary lines the commands print.
"""
