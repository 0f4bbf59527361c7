"""The latency benchmark behind `mobilemllm bench`: one helper per metric (``timing``), warm-up + repeats
(``harness``), one backend per runtime (``backends``), the memory-bandwidth roofline (``roofline``), phone
runs over adb (``adb``) and the table / JSON / CSV / PNG outputs (``report``).

Backends are imported lazily, so ``import mobilemllm.bench`` is cheap.
"""
