import mukv

s = mukv.Session(model="mukv-tiny")  # loads mukv/assets/mukv-tiny (offline, safetensors)
print(s.model.name, s.model.layout, s.model.tokens_per_frame, "visual tokens per frame")
