"""Per-layer micro-benchmark of correction encodings (layer 2 of the shared MiniLM RTE model, k=256, 2 threads).

k0 = MatMulNBits alone; scatter / dense = edgeq encodings; onehot / cscatter = compact [c x r] variants
(Gather → MatMul → OneHot-MatMul + Add, or → ScatterElements) measured and not adopted.  Ratios to k0,
interleaved rounds, median of 60.  Usage: python tools/bench_correction.py [THREADS]
"""
import numpy as np, onnx, onnxruntime as ort, time, copy, sys
from onnx import helper, numpy_helper, TensorProto as T
from pathlib import Path
from edgeq.hf_model import load_model
from edgeq.config import ConvertConfig
from edgeq.plan import plan_layer
import edgeq.onnx.rewrite as rw
from edgeq.quant.pack import pack_codes
REPO = Path(__file__).resolve().parents[1]
lm=load_model(REPO.parent / "shared" / "models" / "minilm-l6-rte"); W=lm.linear_weights()
names=[n for n in W if "layer.2." in n]
def compact_build(layer,x,y_q,y,q,mode):
    p=f"/{layer}/correction"; N,K=q.shape
    rows,cols=np.divmod(q.salient_index,K)
    C,cp=np.unique(cols,return_inverse=True); R,rp=np.unique(rows,return_inverse=True)
    nodes=[helper.make_node("ConstantOfShape",["cshape"],["z"],value=numpy_helper.from_array(np.zeros(1,np.float32))),
           helper.make_node("ScatterND",["z","pos","vals"],["D"]),
           helper.make_node("Gather",[x,"C"],["xs"],axis=-1),
           helper.make_node("MatMul",["xs","D"],["dr"])]
    inits=[numpy_helper.from_array(np.array([C.size,R.size],np.int64),"cshape"),numpy_helper.from_array(np.stack([cp,rp],1).astype(np.int64),"pos"),
           numpy_helper.from_array(q.salient_values,"vals"),numpy_helper.from_array(C.astype(np.int64),"C")]
    if mode=="onehot":
        nodes+=[helper.make_node("OneHot",["R","depth","ohv"],["P"],axis=-1),helper.make_node("MatMul",["dr","P"],["d"]),helper.make_node("Add",[y_q,"d"],[y])]
        inits+=[numpy_helper.from_array(R.astype(np.int64),"R"),numpy_helper.from_array(np.array(N,np.int64),"depth"),numpy_helper.from_array(np.array([0,1],np.float32),"ohv")]
    else:
        nodes+=[helper.make_node("Shape",["dr"],["sh"]),helper.make_node("Expand",["R","sh"],["Re"]),helper.make_node("ScatterElements",[y_q,"Re","dr"],[y],axis=-1,reduction="add")]
        inits+=[numpy_helper.from_array(R.astype(np.int64),"R")]
    return nodes,inits
def graph(q,enc):
    N,K=q.shape
    nodes=[helper.make_node("MatMulNBits",["x","B","S"],["yq" if enc else "y"],domain="com.microsoft",K=K,N=N,bits=4,block_size=32,accuracy_level=0)]
    inits=[numpy_helper.from_array(pack_codes(q.codes,32),"B"),numpy_helper.from_array(q.scales,"S")]
    if enc in ("dense","scatter"): n,i=rw.CORRECTIONS[enc].build("l","x","yq","y",q); nodes+=n; inits+=i
    elif enc: n,i=compact_build("l","x","yq","y",q,enc); nodes+=n; inits+=i
    g=helper.make_graph(nodes,"g",[helper.make_tensor_value_info("x",T.FLOAT,["M",K])],[helper.make_tensor_value_info("y",T.FLOAT,["M",N])],inits)
    m=helper.make_model(g,opset_imports=[helper.make_opsetid("",17),helper.make_opsetid("com.microsoft",1)])
    so=ort.SessionOptions();so.intra_op_num_threads=int(sys.argv[1]) if len(sys.argv)>1 else 2
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
for name in names:
    q=plan_layer(name,W[name],ConvertConfig(k=256)).quant
    encs=[None,"scatter","dense","onehot","cscatter"]
    ss=[graph(q,e) for e in encs]
    N,K=q.shape
    for M in (16,128,1024):
        x=np.random.randn(M,K).astype(np.float32)
        ref=ss[0].run(None,{"x":x})[0]+x@(q.dequantize()-q.dequantize_int4()).T
        for s in ss[1:]: assert np.abs(s.run(None,{"x":x})[0]-ref).max()<1e-3
        R=60; t=np.zeros((len(ss),R))
        for r in range(R):
            for j in range(len(ss)):
                i=(r+j)%len(ss); t0=time.perf_counter(); ss[i].run(None,{"x":x}); t[i,r]=time.perf_counter()-t0
        med=np.median(t,1)
        rows,cols=np.divmod(q.salient_index,K)
        print(f"{name.split('layer.2.')[1]:28s} {N}x{K} c={np.unique(cols).size} r={np.unique(rows).size} M={M}: k0 {med[0]*1e3:.3f} ms; "+" ".join(f"{e} {m/med[0]:.2f}" for e,m in zip(encs[1:],med[1:])),flush=True)
