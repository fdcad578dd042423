"""Auditing TorchXRayVision's public chest X-ray models (`xrv_scores.py`, `xrv_attack.py`).

TorchXRayVision (Cohen et al.) publishes DenseNet-121 classifiers trained on CheXpert
(`densenet121-res224-chex`), on MIMIC-CXR (`densenet121-res224-mimic_ch`) and on PadChest
(`densenet121-res224-pc`). Rebuilding its train/test partition tells us which CheXpert and MIMIC
images each target model was trained on; the PadChest model saw neither dataset and serves as the
single reference (OUT) model of an offline attack. Nothing is trained.

Modules (one concept each):

    split.py       TorchXRayVision's patient-grouped split, rebuilt from our RecordsTable (no torch)
    models.py      weights files in TorchXRayVision's cache layout, loading with calibration off
    preprocess.py  TorchXRayVision's image pipeline: [-1024, 1024] scaling, centre crop, resize 224
    inference.py   batched forward passes → raw logits on the shared label set
    scores.py      xrv_scores.py's work: select records, run the models, write the logdirs
    logdir.py      the per-dataset logdir in the run-directory format (no torch)
    attack.py      xrv_attack.py's work: offline RMIA/LiRA vs the reference, ROC, risk tables
    report.py      report.html of the attack
    cli.py         the two command lines (xrv_scores.py / medleak-xrv-scores, xrv_attack.py /
                   medleak-xrv-attack); imports scores.py only once its flags are parsed

Only models.py, preprocess.py, inference.py and scores.py import torch; nothing outside this
package imports any of them (cli.py: only inside the scores entry point), so the rest of
medleak never needs torch.
"""
