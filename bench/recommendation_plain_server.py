"""The baseline of bench/recommendation_serve.py: a plain FastAPI + uvicorn server answering
GET /recommend?user=U&k=K with ALS scores from memory (user factors . item factors, seen items masked, top-k by
argpartition). No batching, no event store, no validation beyond the types: what people deploy first.

    python bench/recommendation_plain_server.py FACTORS.npz --port 8001
FACTORS.npz: user_factors [U, d], item_factors [I, d], user_ids, item_ids, seen (a user's item columns, flat)
and seen_offsets (CSR-style), as bench/recommendation_serve.py writes them after training implicit's ALS.
"""

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException

parser = argparse.ArgumentParser()
parser.add_argument("factors")
parser.add_argument("--port", type=int, default=8001)
args = parser.parse_args()

data = np.load(args.factors)
users, items = data["user_factors"], data["item_factors"]
item_ids = [str(i) for i in data["item_ids"]]
row_of = {str(u): r for r, u in enumerate(data["user_ids"])}
seen, offsets = data["seen"], data["seen_offsets"]
app = FastAPI()


@app.get("/recommend")
def recommend(user: str, k: int = 10):
    row = row_of.get(user)
    if row is None:
        raise HTTPException(404, "unknown user")
    scores = items @ users[row]
    scores[seen[offsets[row]:offsets[row + 1]]] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top])]
    return {"user": user, "items": [{"item": item_ids[j], "score": float(scores[j])} for j in top]}


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
