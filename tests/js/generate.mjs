// Greedy generation with transformers.js (@huggingface/transformers on onnxruntime-node) from
// a 'dqtool export' folder, as a user deploying to Node would load it.
//
//   node tests/js/generate.mjs MODEL_FOLDER REQUEST.json
//
// REQUEST.json: {"input_ids": [[...], ...], "attention_mask": [[...], ...], "max_new_tokens": N}
// Prints {"sequences": [[...], ...]} (the generated ids, decoder start token first) as JSON.
// The package is resolved from NODE_PATH-free ESM: run with the package installed in a
// node_modules folder above this script or pass its folder in DQTOOL_JS_MODULES.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [folder, requestFile] = process.argv.slice(2);
if (!folder || !requestFile) {
    console.error('usage: node generate.mjs MODEL_FOLDER REQUEST.json');
    process.exit(2);
}
const modules = process.env.DQTOOL_JS_MODULES;
const spec = modules
    ? pathToFileURL(path.join(modules, '@huggingface', 'transformers', 'dist', 'transformers.node.mjs')).href
    : '@huggingface/transformers';
const { env, AutoModelForSeq2SeqLM, Tensor } = await import(spec);

// Local files only: the model folder is loaded from disk, nothing is fetched.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;

const req = JSON.parse(readFileSync(requestFile, 'utf8'));
const rows = req.input_ids.length;
const cols = req.input_ids[0].length;
const tensor = (m) => new Tensor('int64', BigInt64Array.from(m.flat().map(BigInt)), [rows, cols]);

const model = await AutoModelForSeq2SeqLM.from_pretrained(path.basename(path.resolve(folder)), {
    dtype: 'fp32', device: 'cpu',
});
const out = await model.generate({
    inputs: tensor(req.input_ids),
    attention_mask: tensor(req.attention_mask),
    max_new_tokens: req.max_new_tokens,
    do_sample: false,
    num_beams: 1,
});
console.log(JSON.stringify({ sequences: out.tolist().map((r) => r.map(Number)) }));
