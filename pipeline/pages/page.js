"use strict";
// The report page's one script. It reads the page's data (a JSON block) and builds every section
// with DOM calls; text from the data only ever goes in through textContent or setAttribute, never
// as markup, so a file name with quotes, angle brackets or script in it shows as written and runs
// nothing (the page's Content-Security-Policy allows this script alone).
(function () {
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const images = data.images;
  const PAGE = 60; // gallery items built at once; "show more" builds the next page
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  const main = document.getElementById("main");
  const nav = document.getElementById("toc");

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function section(id, title, intro) {
    const node = el("section", { id: id }, el("h2", {}, title));
    if (intro) node.append(el("p", {}, intro));
    main.append(node);
    nav.append(el("a", { href: "#" + id }, title));
    return node;
  }

  function base(path) { return path.split("/").pop(); }
  function percent(x) { return x === null || x === undefined ? "" : (100 * x).toFixed(2) + "%"; }
  function fixed(x, digits) { return typeof x === "number" ? x.toFixed(digits) : ""; }

  // One image: its thumbnail (or a "missing" box), linked to the image, with caption lines.
  function figure(number, lines) {
    const image = images[number];
    const picture = image.src
      ? el("img", { src: image.src, alt: image.path, loading: "lazy", width: 96, height: 96 })
      : el("div", { class: "gone", title: "missing: " + image.path }, "missing");
    const caption = el("figcaption", {}, el("div", { class: "path" }, base(image.path)));
    for (const line of lines) {
      caption.append(el("div", { class: line.wrong ? "wrong" : null }, line.text === undefined ? line : line.text));
    }
    return el("figure", { "data-path": image.path, title: image.path }, picture, caption);
  }

  // Items built a page at a time: a large gallery costs nothing until it is asked for.
  function gallery(parent, items, render) {
    const grid = el("div", { class: "gallery" });
    parent.append(grid);
    let shown = 0;
    const more = el("button", { class: "more", type: "button" });
    function next() {
      const end = Math.min(items.length, shown + PAGE);
      const batch = document.createDocumentFragment();
      for (; shown < end; shown++) batch.append(render(items[shown]));
      grid.append(batch);
      more.textContent = "show " + Math.min(PAGE, items.length - shown) + " more of " + (items.length - shown);
      more.hidden = shown >= items.length;
    }
    more.addEventListener("click", next);
    parent.append(more);
    next();
    if (!items.length) grid.append(el("p", {}, "none"));
    return grid;
  }

  // --- header -------------------------------------------------------------------------------------
  document.getElementById("title").textContent = data.title;
  const run = data.run;
  if (run) {
    const parts = [run.kind + " run", run.head ? "head " + run.head : null, run.backbones,
                   run.task === "classes" ? null : run.task,
                   run.classes.length + " classes", run.created];
    document.getElementById("subtitle").textContent = parts.filter(Boolean).join(" · ");
  }
  for (const note of data.notes) main.append(el("p", { class: "note" }, note));

  // --- metrics ------------------------------------------------------------------------------------
  if (data.metrics && Object.keys(data.metrics).length) {
    const node = section("metrics", "Metrics", "Accuracy with its 95% Wilson interval, per split.");
    const splits = Object.keys(data.metrics);
    const rows = [["images", (m) => m.images], ["accuracy", (m) => percent(m.accuracy)],
      ["95% interval", (m) => m.accuracy_ci95_low === undefined ? "" :
        percent(m.accuracy_ci95_low) + " – " + percent(m.accuracy_ci95_high)],
      ["mean per-class accuracy", (m) => percent(m.mean_per_class_accuracy)],
      ["macro F1", (m) => fixed(m.macro_f1, 4)], ["micro F1", (m) => fixed(m.micro_f1, 4)],
      ["hamming accuracy", (m) => percent(m.hamming_accuracy)],
      ["mean average precision", (m) => fixed(m.mean_average_precision, 4)],
      ["log loss", (m) => fixed(m.loss, 4)], ["calibration error (ECE)", (m) => fixed(m.ece, 4)]];
    const table = el("table", { id: "metrics-table" }, el("tr", {}, el("th", {}), ...splits.map((s) => el("th", {}, s))));
    for (const [name, value] of rows) {
      const cells = splits.map((s) => value(data.metrics[s]));
      if (cells.every((c) => c === "" || c === undefined)) continue;
      table.append(el("tr", {}, el("th", { class: "row" }, name), ...cells.map((c) => el("td", {}, c))));
    }
    node.append(el("div", { class: "scroll" }, table));
  }

  // --- the evaluated split: matrix and errors --------------------------------------------------------
  const evaluation = data.evaluation;
  function predictedLines(number) {
    const row = evaluation.rows[evaluation.row_of[number]];
    const image = images[number];
    const lines = [{ text: "given " + (image.label || "(none)") }];
    lines.push({ text: "predicted " + (row.predicted || "(none)"), wrong: row.predicted !== image.label });
    lines.push({ text: row.top.map(([name, p]) => name + " " + p.toFixed(3)).join(", ") });
    return lines;
  }
  if (evaluation) {
    const matrix = evaluation.matrix;
    const confusion = matrix.kind === "confusion";
    const node = section("matrix", confusion ? "Confusion matrix" : "Labels",
      (confusion ? "Rows: the given class; columns: the predicted one. " :
        "Each label's true positives, misses and false alarms. ") +
      "Choose a cell to see its images (" + evaluation.split + " split, " + evaluation.rows.length + " images).");
    const header = el("tr", {}, el("th", {}, confusion ? "given \\ predicted" : "label"),
      ...matrix.columns.map((c) => el("th", {}, c)));
    const table = el("table", { id: "confusion" }, header);
    const target = el("div", { id: "cell-images" });
    let chosen = null;
    matrix.cells.forEach((cells, r) => {
      const tr = el("tr", {}, el("th", { class: "row" }, matrix.rows[r]));
      cells.forEach((numbers, c) => {
        const button = el("button", { class: "cell", type: "button", "data-row": r, "data-column": c,
          "data-count": numbers.length }, numbers.length);
        button.addEventListener("click", () => {
          if (chosen) chosen.classList.remove("chosen");
          chosen = button;
          button.classList.add("chosen");
          target.replaceChildren(el("h3", {}, (confusion ? "given " + matrix.rows[r] + ", predicted " +
            matrix.columns[c] : matrix.rows[r] + ": " + matrix.columns[c]) + " — " + numbers.length + " images"));
          gallery(target, numbers, (n) => figure(n, predictedLines(n)));
          target.scrollIntoView({ block: "nearest" });
        });
        tr.append(el("td", { class: confusion && r === c ? "diagonal" : null }, button));
      });
      table.append(tr);
    });
    node.append(el("div", { class: "scroll" }, table), target);
    const errors = section("errors", "Errors", "The " + evaluation.split + " images the run gets wrong (" +
      evaluation.errors.length + "), most confident first.");
    gallery(errors, evaluation.errors, (n) => figure(n, predictedLines(n)));
  }

  // --- the audit --------------------------------------------------------------------------------------
  if (data.suspects) {
    const issues = (data.audit && data.audit.label_issues) || {};
    const node = section("suspects", "Label suspects", (data.suspects.length) + " images whose given label " +
      "cleanlab doubts (out-of-fold probabilities), most suspicious first. " + (issues.method || ""));
    gallery(node, data.suspects, (s) => figure(s.i, [
      { text: images[s.i].split }, { text: "given " + (s.given || "(none)") },
      { text: "suggested " + (s.suggested || "(none)"), wrong: true }, { text: "score " + fixed(s.score, 4) }]));
  }
  if (data.pairs) {
    const node = section("pairs", "Cross-split near-duplicates", data.pairs.total + " pairs of images in two " +
      "splits that look alike; the closest " + data.pairs.rows.length + " shown, side by side.");
    const list = el("div", { class: "pairs" });
    for (const pair of data.pairs.rows) {
      list.append(el("div", { class: "pair" },
        el("div", { class: "two" }, figure(pair.a, [images[pair.a].split + ", " + (images[pair.a].label || "")]),
          figure(pair.b, [images[pair.b].split + ", " + (images[pair.b].label || "")])),
        el("p", {}, "similarity " + fixed(pair.similarity, 4) + (pair.exact ? " (same bytes)" : ""))));
    }
    if (!data.pairs.rows.length) list.append(el("p", {}, "none"));
    node.append(list);
  }

  // --- unknowns and suggestions -------------------------------------------------------------------------
  if (data.unknowns) {
    const u = data.unknowns;
    const checked = Object.entries(u.checked).map(([k, v]) => v + " " + k).join(" and ");
    const node = section("unknowns", "Unknowns", u.rows.length + " of " + checked + " images lie farther " +
      "from the training images than the run's threshold (" + fixed(u.threshold, 4) + ", at which " +
      percent(u.false_rejection_rate) + " of validation images would be flagged), farthest first.");
    gallery(node, u.rows, (r) => figure(r.i, [{ text: images[r.i].split || "unlabelled" },
      { text: "score " + fixed(r.score, 4) }, { text: "head says " + r.guess }]));
  }
  if (data.suggestions) {
    const s = data.suggestions;
    const node = section("suggestions", "What to label next", s.rows.length + " of " + s.unlabelled +
      " unlabelled images, ranked by " + s.how + ".");
    gallery(node, s.rows, (r) => figure(r.i, [{ text: "guess " + (r.guess || "(none)") },
      { text: "score " + fixed(r.score, 4) }]));
  }

  // --- the map ---------------------------------------------------------------------------------------------
  const preview = document.getElementById("preview");
  function showPreview(event, number) {
    const image = images[number];
    preview.replaceChildren(image.src ? el("img", { src: image.src, alt: "" }) : el("div", {}, "missing"),
      el("div", {}, image.path), el("div", {}, (image.split || "unlabelled") + (image.label ? ", " + image.label : "")));
    preview.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - 230);
    const y = Math.min(event.clientY + 14, window.innerHeight - 190);
    preview.style.left = x + "px";
    preview.style.top = y + "px";
  }
  if (data.map && data.map.points.length) {
    const node = section("map", "Map", "Every image as a point, near ones alike: " + data.map.how +
      ". Hover over a point to see its image.");
    const labels = [...new Set(data.map.points.map((p) => images[p[2]].label || ""))].sort();
    const colour = (label) => label ? PALETTE[labels.filter(Boolean).indexOf(label) % PALETTE.length] : "#b0b0b0";
    const legend = el("div", { class: "legend" });
    for (const label of labels) {
      const item = el("span", {}, label || "unlabelled");
      item.style.setProperty("--swatch", colour(label));
      legend.append(item);
    }
    const xs = data.map.points.map((p) => p[0]), ys = data.map.points.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const span = Math.max(x1 - x0, y1 - y0, 1e-9), pad = span * 0.03, radius = span / 180;
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", [x0 - pad, -(y1 + pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad].join(" "));
    svg.setAttribute("id", "map-points");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "2-D map of the images");
    for (const [x, y, number] of data.map.points) {
      const dot = document.createElementNS(NS, "circle");
      dot.setAttribute("cx", x);
      dot.setAttribute("cy", -y);
      dot.setAttribute("r", radius);
      dot.setAttribute("fill", colour(images[number].label || ""));
      dot.setAttribute("data-path", images[number].path);
      const title = document.createElementNS(NS, "title");
      title.textContent = images[number].path;
      dot.append(title);
      dot.addEventListener("mouseenter", (event) => showPreview(event, number));
      dot.addEventListener("mouseleave", () => { preview.hidden = true; });
      svg.append(dot);
    }
    node.append(legend, el("div", { class: "map" }, svg));
  }

  // --- missing images ------------------------------------------------------------------------------------------
  if (data.missing.length) {
    const node = section("missing", "Missing images", data.missing.length + " images the page refers to " +
      "could not be read where the cache says they are (moved or deleted since): they are shown as \"missing\".");
    const list = el("ul", { class: "missing" });
    for (const path of data.missing.slice(0, 1000)) list.append(el("li", {}, path));
    node.append(list);
  }
  document.body.setAttribute("data-ready", "true");
})();
