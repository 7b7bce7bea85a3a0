// Reference outputs of a tfjs graph model: the pure-JS cpu backend of @tensorflow/tfjs (no native code),
// on float32 NHWC inputs; writes the named output node as raw float32. A developer tool, not a runtime
// dependency: scripts/make_faceres_fixture.py runs it from a scratch folder holding @tensorflow/tfjs@4.22.0.
// usage: node tfjs_reference.js MODEL_DIR/model.json input.f32 N H W C output_node out.f32
const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');
async function main() {
  const [modelJson, inFile, n, h, w, c, outNode, outFile] = process.argv.slice(2);
  await tf.setBackend('cpu');
  const spec = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const dir = path.dirname(modelJson);
  const specs = [], bufs = [];
  for (const g of spec.weightsManifest) {
    for (const s of g.weights) specs.push(s);
    for (const p of g.paths) bufs.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(bufs);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
  const model = await tf.loadGraphModel(tf.io.fromMemory({ modelTopology: spec.modelTopology, weightSpecs: specs, weightData, format: spec.format }));
  const raw = fs.readFileSync(inFile);
  const x = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [+n, +h, +w, +c]);
  const y = model.execute(x, outNode);
  fs.writeFileSync(outFile, Buffer.from((await y.data()).buffer));
  console.log('backend', tf.getBackend(), 'tfjs', tf.version.tfjs, 'output', y.shape.join('x'));
}
main();
