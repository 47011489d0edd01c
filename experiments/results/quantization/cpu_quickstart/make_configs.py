import yaml
KV = {"targets": {"include": "language_model.*(k_proj|v_proj)$"}, "points": ["output"],
      "spec": {"bits": 8, "granularity": "token", "mode": "dynamic", "symmetric": False}}
def cb(kind, wbits, abits, gran):
    w = {"bits": wbits, "granularity": "channel" if gran == "ch" else "group", "symmetric": True, "observer": "mse"}
    if gran != "ch":
        w["group_size"] = 32
    a = {"bits": abits, "granularity": "tensor", "symmetric": False, "observer": "percentile"}
    args = {"targets": {"include": "language_model", "exclude": "lm_head"}, "weights": w, "activations": a,
            "activation_points": ["input"], "activation_sites": [KV], "calibration_batches": 8}
    cls = "plugins.quantization.PostTrainingQuantization" if kind == "ptq" else "plugins.quantization.QuantizationAwareTraining"
    if kind == "qat":
        args["calibration_batches"] = 8
    return {"trainer": {"callbacks": [{"class_path": cls, "init_args": args}]}}
for kind in ("ptq", "qat"):
    for w, a in ((8, 8), (4, 8), (4, 16), (2, 8)):
        for g in ("ch", "g32"):
            name = f"{kind}_w{w}a{a}_{g}"
            open(f"cfg/{name}.yaml", "w").write(yaml.safe_dump(cb(kind, w, a, g)))
