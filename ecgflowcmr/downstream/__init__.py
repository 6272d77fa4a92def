"""The paper's purpose: MAE pretraining on real + synthetic cines, CV fine-tuning on labelled ones.

    vit.py       video ViT (tubelets, timm blocks), VideoMAE with tube masking, fine-tuning head
    data.py      labelled vs pretraining subjects (disjoint), label columns, folds, balanced
                 cohorts, how synthetic counts are drawn from the ECG-only pool
    sources.py   the ECG-only pool and the synthetic sources: generator, nearest, template, oracle
    pretrain.py  one resumable VideoMAE run per table row
    finetune.py  k-fold fine-tuning and per-fold scores
    metrics.py   ACC, AUC, MAE, R^2, fold mean +- std
    report.py    downstream.{md,json} and downstream.png
    run.py       the experiment (``downstream.py``)
"""
