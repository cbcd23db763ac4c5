"""The commands, one module each, runnable as ``python -m mcl_det.cli.<command>``: ``pretrain``
(behind ``pretrain/main.py``), ``train_net``, ``convert_to_d2``, ``report``, ``submit``,
``make_toy_data``, ``linear_eval`` (behind ``tools/<command>.py``). ``run`` is what they share:
exit codes, the run-mode flags, the output folder, the local launcher and its workers.
"""
