# gqa-serve on a CUDA PyTorch base: the image's torch (with triton) satisfies pyproject's torch>=2.4,
# so `pip install` adds only the serving stack. Build: docker build -t gqa-serve .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY model ./model
COPY server ./server
COPY configs ./configs
# The same install command the README and CI run (editable), minus the test extras.
RUN pip install --no-cache-dir -e '.[triton]'

# Models live on a volume: mount HF directories there, and the default model is cached there on first start.
VOLUME /models
ENV GQA_HOST=0.0.0.0 \
    GQA_PORT=8000 \
    GQA_MODEL_CACHE_DIR=/models
EXPOSE 8000
ENTRYPOINT ["gqa-serve", "serve"]
