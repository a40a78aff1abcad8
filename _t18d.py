import time, numpy as np, torch
from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.encoder import DualEncoder
from treeidx.torch import GlobalContrastiveBatchSampler as G, TreeBatchSampler as T
from treeidx import TreeIndex
t=time.time(); data=CodeSearchData.load(); print("load", time.time()-t, data.n_targets, data.train.size, flush=True)
m=DualEncoder(data.query_features, data.target_features, dim=64, shared=True, seed=0)
rows=data.train; pos=data.query_target[rows]
t=time.time()
with torch.no_grad():
    q=m.encode_all_queries(rows).numpy(); p=torch.cat([m.encode_targets(pos[i:i+32768]) for i in range(0,len(pos),32768)]).numpy()
print("encode pairs", time.time()-t, flush=True)
for backend_n in [10]:
    s=G((q,p),128,n_neighbors=backend_n)
    t=time.time(); z=np.hstack([q,p]); tr=TreeIndex.build(z, seed=0); print("build", time.time()-t, flush=True)
    t=time.time(); sc,nb=tr.search(z[:5000],10,exclude=np.arange(5000)); print("search 5000", time.time()-t, tr.last_search_inner_products.mean(), flush=True)
    t=time.time(); b=next(iter(s)); print("gcbs first batch (graph+rcm)", time.time()-t, s.last_graph, flush=True)
t=time.time(); ids=np.unique(pos); tr=TreeIndex.build(p[np.unique(pos, return_index=True)[1]], ids, seed=0); print("tree build positives", time.time()-t)
ts=T(tr,128,keys=pos); t=time.time(); b=next(iter(ts)); print("tree batches grouping", time.time()-t)
t=time.time(); tall=TreeIndex.build(m.encode_all_targets().numpy(), seed=0); print("build all", time.time()-t)
ts=T(tall,128,keys=pos); t=time.time(); b=next(iter(ts)); print("tree batches grouping all", time.time()-t)
