# One image for every service of docker-compose.yml: the site, Celery, the DHT peer, block servers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# CUDA build of torch for block servers on GPUs; the CPU build is enough for the site.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
COPY requirements.txt .
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX" && pip install -r requirements.txt

COPY . .
# Without DEBUG, so that the hashed, compressed files and their manifest are built (the key signs nothing here).
ENV STATIC_ROOT=/app/staticfiles
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

EXPOSE 8000 31337 31338
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "config.asgi:application"]
