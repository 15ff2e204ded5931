// Runs an edgeq ONNX model in a JavaScript ONNX Runtime client and writes its outputs as JSON.
//
//   node run.mjs DIR [--backend node|web]
//
// DIR/inputs.json (written by tests/test_deploy_node.py):
//   {"model": "model.onnx", "output": "logits", "batches": [{"input_ids": {"dims": [b, s], "data": [...]}, ...}]}
// writes DIR/outputs-<backend>.json: {"runtime": "...", "version": "...", "batches": [{"dims": [...], "data": [...]}]}
//
// backend "node": onnxruntime-node (native CPU execution provider);
// backend "web":  onnxruntime-web with its WebAssembly execution provider, run in Node (single thread).
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

const args = process.argv.slice(2);
const dir = args.find((a) => !a.startsWith('--'));
const bi = args.indexOf('--backend');
const backend = bi >= 0 ? args[bi + 1] : 'node';
if (!dir || !['node', 'web'].includes(backend)) {
  console.error('usage: node run.mjs DIR [--backend node|web]');
  process.exit(2);
}

const pkg = backend === 'node' ? 'onnxruntime-node' : 'onnxruntime-web';
const ort = await import(pkg);
const version = ort.env.versions?.[backend] ?? ort.env.versions?.common ?? 'unknown';
const spec = JSON.parse(await readFile(path.join(dir, 'inputs.json'), 'utf8'));
const modelBytes = await readFile(path.resolve(dir, spec.model));

let options = {};
if (backend === 'web') {
  ort.env.wasm.numThreads = 1; // no worker threads: deterministic and works in plain Node
  options = { executionProviders: ['wasm'] };
} else {
  options = { executionProviders: ['cpu'], intraOpNumThreads: 1 };
}
const session = await ort.InferenceSession.create(modelBytes, options);

const out = { runtime: pkg, version, inputNames: session.inputNames, outputNames: session.outputNames, batches: [] };
for (const batch of spec.batches) {
  const feeds = {};
  for (const name of session.inputNames) {
    const t = batch[name];
    if (!t) throw new Error(`inputs.json has no ${name} for the model's input ${name}`);
    feeds[name] = new ort.Tensor('int64', BigInt64Array.from(t.data, (v) => BigInt(v)), t.dims);
  }
  const res = await session.run(feeds);
  const y = res[spec.output];
  out.batches.push({ dims: y.dims, data: Array.from(y.data) });
}
await writeFile(path.join(dir, `outputs-${backend}.json`), JSON.stringify(out));
console.log(`${pkg} ${version}: ${out.batches.length} batches, output ${spec.output}`);
