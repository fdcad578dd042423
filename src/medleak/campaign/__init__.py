"""Stages 2–4 orchestration: the patient-level plan, the file-lock work queue, the run directory,
and the campaign entry point shared by the per-dataset scripts."""
