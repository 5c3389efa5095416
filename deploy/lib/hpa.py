"""The HPA controller's replica computation (Kubernetes autoscaling/v2) for
one External metric of type AverageValue, as KEDA configures it, with the
ScaledObject's `advanced.horizontalPodAutoscalerConfig.behavior`:
stabilisation windows and rate policies. Times are divided by `speedup`.
Run directly for a self-test (deploy/check does).
"""

import math

HPA_SYNC_S = 15.0      # kube-controller-manager --horizontal-pod-autoscaler-sync-period
HPA_TOLERANCE = 0.1    # --horizontal-pod-autoscaler-tolerance


class Hpa:
    """The HPA controller's replica computation for one External AverageValue metric, with behaviour."""

    def __init__(self, spec, speedup):
        b = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        self.min = max(int(spec.get("minReplicaCount", 0)), 1)  # the HPA never goes under 1; KEDA does 1 <-> 0
        self.max = int(spec["maxReplicaCount"])
        self.speedup = speedup
        self.up, self.down = b["scaleUp"], b["scaleDown"]
        self.recs = []     # (time, recommendation)
        self.events = []   # (time, delta)

    def _window(self, rules):
        return float(rules.get("stabilizationWindowSeconds", 0)) / self.speedup

    def _limit(self, rules, current, now, up):
        limits = []
        for p in rules["policies"]:
            period = float(p["periodSeconds"]) / self.speedup
            moved = sum(d for t, d in self.events if now - t <= period and (d > 0) == up)
            start = current - moved  # replicas at the start of the period (moved < 0 when down)
            if p["type"] == "Pods":
                limits.append(start + p["value"] if up else start - p["value"])
            else:
                limits.append(math.ceil(start * (1 + p["value"] / 100)) if up
                              else math.ceil(start * (1 - p["value"] / 100)))
        select = rules.get("selectPolicy", "Max")
        if up:
            return max(limits) if select == "Max" else min(limits)
        return min(limits) if select == "Max" else max(limits)

    def replicas(self, current, metric, target, now):
        usage = metric / (target * current)
        desired = current if abs(usage - 1) <= HPA_TOLERANCE else math.ceil(metric / target)
        desired = min(max(desired, self.min), self.max)
        self.recs.append((now, desired))
        keep = max(self._window(self.up), self._window(self.down))
        self.recs = [(t, r) for t, r in self.recs if now - t <= keep]
        up_rec = min(r for t, r in self.recs if now - t <= self._window(self.up))
        down_rec = max(r for t, r in self.recs if now - t <= self._window(self.down))
        rec = current
        if rec < up_rec:
            rec = up_rec
        if rec > down_rec:
            rec = down_rec
        if rec > current:
            rec = min(rec, self._limit(self.up, current, now, True))
        elif rec < current:
            rec = max(rec, self._limit(self.down, current, now, False))
        rec = min(max(rec, self.min), self.max)
        if rec != current:
            self.events.append((now, rec - current))
        return rec


def _selftest():
    spec = {"minReplicaCount": 0, "maxReplicaCount": 6, "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
            {"type": "Pods", "value": 4, "periodSeconds": 15}, {"type": "Percent", "value": 100, "periodSeconds": 15}]},
        "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Min", "policies": [
            {"type": "Percent", "value": 50, "periodSeconds": 60}]}}}}}
    h = Hpa(spec, 1)
    assert h.replicas(1, 2000, 10, 0) == 5, "up by at most 4 pods (or 100 %) per 15 s"
    assert h.replicas(5, 2000, 10, 5) == 5, "no more within the same 15 s"
    assert h.replicas(5, 2000, 10, 16) == 6, "bounded by maxReplicaCount"
    assert h.replicas(6, 0, 10, 30) == 6, "scale-down waits for the stabilisation window"
    assert h.replicas(6, 0, 10, 317) == 3, "then at most 50 % per minute"
    assert h.replicas(3, 0, 10, 340) == 3, "not again within that minute"
    assert h.replicas(3, 0, 10, 380) == 2, "ceil(3 * 0.5)"
    assert h.replicas(2, 21, 10, 390) == 2, "within the 10 % tolerance: unchanged"
    assert h.replicas(2, 0, 10, 1000) == 1, "the HPA never goes under 1 (KEDA does 1 -> 0)"
    print("ok   HPA replica computation self-test")


if __name__ == "__main__":
    _selftest()
