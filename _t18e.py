import time, numpy as np, torch
from treeidx.codesearch import CodeSearchData
from treeidx.codesearch.encoder import DualEncoder
data=CodeSearchData.load()
m=DualEncoder(data.query_features, data.target_features, dim=64, shared=True, seed=0)
rows=data.train; pos=data.query_target[rows]
with torch.no_grad():
    q=m.encode_all_queries(rows); p=m.encode_targets(pos)
z=torch.cat([q,p],1)
print(torch.get_num_threads())
for blk in (1024,2048):
    t=time.time()
    n=z.shape[0]; out=torch.empty(n,10,dtype=torch.int64)
    for lo in range(0,n,blk):
        s=z[lo:lo+blk]@z.T
        s[torch.arange(s.shape[0]),torch.arange(lo,lo+s.shape[0])]=-float('inf')
        out[lo:lo+blk]=s.topk(10,dim=1).indices
    print(blk, time.time()-t, flush=True)
