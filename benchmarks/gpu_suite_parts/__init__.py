"""The parts of benchmarks/gpu_suite.py, one job a module (the entry point keeps the CLI, the
section table and the report's writing):

  common        paths, the peak TFLOP/s, the entry script the worker processes re-run
  wheels        --prepare (CPU: the carried wheels) and --install-carried (GPU: unpack them)
  runner        Suite: child processes, their environment, budgets, results; run_steps
  metrics       metrics.jsonl -> tokens/s, MFU, errors of a finished process
  environment   the install and env sub-steps
  correctness   correctness_tiny (GPU vs CPU, fp32 and bf16) and correctness_hf (vs the HF export)
  throughput    the trainer's throughput runs: tput_* (mixed, pure, compile, TE, cuDNN, chunked CE), proxies
  baseline      the plain PyTorch + transformers baseline
  sft           sft_varlen: packed SFT, varlen vs the dense mask
  planner       micro-batch choice, planned vs measured memory and step time, the goals
  report        gpu_suite.md
"""
