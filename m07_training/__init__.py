"""The library behind training.py, one concept per file, each the production twin of a lesson.

    loss.py          lesson 1   cross_entropy, perplexity
    optimizers.py    lesson 2   SGD, AdamW
    schedules.py     lesson 3   cosine_lr, linear_lr, wsd_lr, CosineScheduler, the LR of one update
    clipping.py      lesson 4   clip_grad_norm
    devices.py       lesson 4   pick_device, mixed precision (autocast), unwrap
    doctor.py        lesson 5   diagnose: what went wrong in a run, and what to try
    data.py          lesson 6   CharTokenizer, load_corpus, get_batch, batch_seed
    download.py      lesson 6   download_corpus: URL + SHA-256 + cache
    checkpoint.py    lesson 6   save_checkpoint, read_checkpoint, load_checkpoint
    run_files.py     lesson 6   a run's out_dir: its lock, atomic writes, history.jsonl
    config.py        lesson 6   TrainConfig: every knob of a run, and a flag of the CLI
    loop.py          lesson 6   train, evaluate, update: the training loop
    scoring.py       lesson 6   score_text, Score: a whole text scored once, with its standard error
    ngram.py         lesson 6   KneserNey, ngram_ladder: the counting baselines a GPT must beat
    mixture.py       lesson 6   count_for_mixing, score_mixed: the GPT and an n-gram, averaged
    signals.py       lesson 6   stopping cleanly on Ctrl-C or SIGTERM
    sampling.py      lesson 6   sample_text, sample_from_checkpoint, the m07-sample command
    plot.py          lesson 6   plot_run: a run's curves and the doctor's findings, the m07-plot command
    distributed.py   lesson 7   torchrun: process groups, ranks that agree
    muon.py          lesson 8   newton_schulz, Muon, MuonWithAdamW

Import the public names from `training` (training.py, the face of this package); the modules
here import each other, never training.py.
"""
