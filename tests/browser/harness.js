// Runs a notebook's OJS source the way Quarto's runtime does, from npm packages only:
// split the block into cells, parseCell each -> one runtime variable per cell (two for `viewof x`); every
// <script type="ojs-define"> on the page becomes variables (Quarto reads the notebook's stored
// ojs_define outputs the same way); local ES-module imports resolve against the URL the
// rendered page will have, so a wrong relative path fails here as it would on the site.
import {Runtime} from "./node_modules/@observablehq/runtime/src/index.js";

const {parseCell, CellParser, Library} = window.observablehq;
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const GeneratorFunction = Object.getPrototypeOf(function* () {}).constructor;
const AsyncGeneratorFunction = Object.getPrototypeOf(async function* () {}).constructor;

// What the test reads: every variable's latest value, the names still computing, every error.
const state = (window.__ojs = {values: {}, errors: [], pending: new Set()});

function observer(name, element) {
  return {
    pending() { state.pending.add(name); },
    fulfilled(value) {
      state.pending.delete(name);
      state.values[name] = value;
      if (!element) return;
      element.classList.remove("ojs-error");
      if (value instanceof Node) element.replaceChildren(value);
      else element.replaceChildren();  // like Quarto, show only cells that produce DOM
    },
    rejected(error) {
      state.pending.delete(name);
      state.errors.push(`${name}: ${error && error.message || error}`);
      if (element) { element.classList.add("ojs-error"); element.textContent = String(error); }
    },
  };
}

// `viewof x` inside a function body is not JavaScript: rename it to a plain parameter.
const viewParam = (name) => `$viewof_${name}`;

function compile(cell, source) {
  const params = [], inputs = [];
  for (const ref of cell.references) {
    const view = ref.type === "ViewExpression";
    const input = view ? `viewof ${ref.id.name}` : ref.name;
    if (inputs.includes(input)) continue;
    inputs.push(input);
    params.push(view ? viewParam(ref.id.name) : ref.name);
  }
  let body = source.slice(cell.body.start, cell.body.end)
    .replace(/\bviewof\s+([A-Za-z_$][\w$]*)/g, (_, name) => viewParam(name));
  body = cell.body.type === "BlockStatement" ? body.slice(1, -1) : `return (\n${body}\n);`;
  const Fn = cell.async && cell.generator ? AsyncGeneratorFunction : cell.async ? AsyncFunction
    : cell.generator ? GeneratorFunction : Function;
  return {inputs, definition: new Fn(...params, body)};
}

// Parser 6 parses one cell at a time; an {ojs} block holds several, one after another (Quarto
// splits it at render time). Walk the block with the parser's own grammar to find where each
// cell ends, then parse each cell's text on its own.
class BlockParser extends CellParser {
  parseTopLevel(node) {
    node.cells = [];
    while (this.type !== window.acorn.tokTypes.eof) node.cells.push(this.parseCell(this.startNode()));
    return this.finishNode(node, "Program");
  }
}

function splitCells(block) {
  return BlockParser.parse(block, {}).cells.map((cell) => block.slice(cell.start, cell.end));
}

function ojsDefines() {
  return [...document.querySelectorAll('script[type="ojs-define"]')]
    .flatMap((script) => JSON.parse(script.textContent).contents);
}

window.runOjs = function runOjs(source, documentUrl) {
  // Runtime 6 takes builtins as definitions (functions returning the value); Plot, Inputs and d3
  // come from the local UMD builds instead of the stdlib's CDN require.
  const builtins = {...new Library(), Plot: () => window.Plot, Inputs: () => window.Inputs, d3: () => window.d3};
  const main = new Runtime(builtins).module();
  for (const {name, value} of ojsDefines()) main.variable(observer(name)).define(name, [], () => value);

  const container = document.getElementById("cells");
  const cells = splitCells(source);
  for (const cellSource of cells) {
    const cell = parseCell(cellSource);
    const element = document.createElement("div");
    element.className = "ojs-cell";
    container.append(element);
    if (cell.body.type === "ImportDeclaration") {
      const module = import(new URL(cell.body.source.value, documentUrl).href);
      for (const specifier of cell.body.specifiers) {
        const local = specifier.local.name, imported = specifier.imported ? specifier.imported.name : "default";
        main.variable(observer(local)).define(local, [], () => module.then((m) => {
          if (!(imported in m)) throw new Error(`${cell.body.source.value} does not export ${imported}`);
          return m[imported];
        }));
      }
      continue;
    }
    const {inputs, definition} = compile(cell, cellSource);
    if (!cell.id) {
      main.variable(observer(`anonymous cell ${cells.indexOf(cellSource)}`, element)).define(inputs, definition);
    } else if (cell.id.type === "ViewExpression") {
      const name = cell.id.id.name;
      main.variable(observer(`viewof ${name}`, element)).define(`viewof ${name}`, inputs, definition);
      main.variable(observer(name)).define(name, ["Generators", `viewof ${name}`], (G, view) => G.input(view));
    } else if (cell.id.type === "Identifier") {
      main.variable(observer(cell.id.name, element)).define(cell.id.name, inputs, definition);
    } else {
      throw new Error(`unsupported OJS cell kind: ${cell.id.type}`);
    }
  }
  return cells.length;
};
window.harnessReady = true;
