(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lmeval-report").textContent);
  var table = document.getElementById("documents-table");
  if (!table || !data.columns) { return; }
  var head = table.tHead, body = table.tBodies[0], filter = document.getElementById("doc-filter");
  var view = document.getElementById("token-view");
  var order = { column: -1, descending: false };

  // the Python tables' format (lmeval.view.report._fmt): 4 decimals below 10, 2 above, 4
  // significant digits beyond 1e5 or below 1e-3, thousands separated, a sign on deltas
  var signed = data.columns.map(function (name) { return name.indexOf("\u0394") === 0; });
  function fmt(v, column) {
    if (v === null || v === undefined) { return "\u2013"; }
    if (typeof v !== "number") { return String(v); }
    if (Number.isInteger(v)) { return String(v).replace(/\B(?=(\d{3})+(?!\d))/g, ","); }
    var a = Math.abs(v);
    var s = (a !== 0 && (a >= 1e5 || a < 1e-3)) ? v.toPrecision(4) : (a < 10 ? v.toFixed(4).replace(/0+$/, "").replace(/\.$/, "") : v.toFixed(2));
    return v > 0 && signed[column] ? "+" + s : s;
  }

  // lmeval.view.render.heat_colour, on its scale (SCALE_BITS): the terminal and HTML views' colours
  function heat(bits) {
    var t = Math.min(Math.max(bits, 0) / data.scale_bits, 1);
    return "hsl(" + Math.round(120 * (1 - t)) + ",85%," + Math.round(88 - 38 * t) + "%)";
  }

  function showDocument(doc, row) {
    Array.prototype.forEach.call(body.rows, function (r) { r.classList.remove("selected"); });
    row.classList.add("selected");
    while (view.firstChild) { view.removeChild(view.firstChild); }
    var models = data.views[doc];
    var title = document.createElement("h3");
    title.textContent = "Document " + doc;
    view.appendChild(title);
    if (!models) {
      var none = document.createElement("p");
      none.textContent = "No token view is embedded for this document.";
      view.appendChild(none);
      return;
    }
    function map(rows, heading, bitsOf, describe) {
      var h = document.createElement("h3");
      h.textContent = heading;
      view.appendChild(h);
      var div = document.createElement("div");
      div.className = "heat";
      rows.forEach(function (t) {
        var span = document.createElement("span");
        span.className = "tok";
        span.textContent = t[0];
        span.title = describe(t);
        span.style.background = heat(bitsOf(t));
        div.appendChild(span);
      });
      view.appendChild(div);
    }
    Object.keys(models).forEach(function (model) {
      map(models[model], model + ": surprisal in bits per token", function (t) { return t[1]; },
          function (t) { return t[1].toFixed(3) + " bits, rank " + t[2]; });
    });
    var moved = data.divergence[doc] || {};
    Object.keys(moved).forEach(function (model) {
      // KL on the colour scale of 0 to 5 nats (20 bits / 4): where the model moved from the baseline
      map(moved[model], model + ": KL(baseline || model) in nats per token", function (t) { return 4 * t[1]; },
          function (t) { return "KL " + t[1].toFixed(4) + " nats, \u0394p " + (t[2] === null ? "\u2013" : t[2].toFixed(4)); });
    });
    view.scrollIntoView({ block: "nearest" });
  }

  function render() {
    var needle = filter ? filter.value.toLowerCase() : "";
    var rows = data.rows.filter(function (r) { return String(r[0]).toLowerCase().indexOf(needle) !== -1; });
    if (order.column >= 0) {
      var c = order.column, sign = order.descending ? -1 : 1;
      rows.sort(function (a, b) {
        var x = a[c], y = b[c];
        if (x === y) { return 0; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        return (x < y ? -1 : 1) * sign;
      });
    }
    var fragment = document.createDocumentFragment();
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = String(r[0]);
      td.appendChild(button);
      tr.appendChild(td);
      for (var i = 1; i < r.length; i++) {
        td = document.createElement("td");
        td.className = "num";
        td.textContent = fmt(r[i], i);
        tr.appendChild(td);
      }
      fragment.appendChild(tr);
    });
    while (body.firstChild) { body.removeChild(body.firstChild); }
    body.appendChild(fragment);
  }

  var tr = document.createElement("tr");
  data.columns.forEach(function (name, i) {
    var th = document.createElement("th");
    th.scope = "col";
    th.setAttribute("aria-sort", "none");
    var button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.addEventListener("click", function () {
      order.descending = order.column === i ? !order.descending : false;
      order.column = i;
      Array.prototype.forEach.call(tr.children, function (cell) { cell.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", order.descending ? "descending" : "ascending");
      render();
    });
    th.appendChild(button);
    tr.appendChild(th);
  });
  head.appendChild(tr);
  if (filter) { filter.addEventListener("input", render); }
  // one listener for every document's button (the table is rebuilt on each sort and filter)
  body.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (button) { showDocument(button.textContent, button.closest("tr")); }
  });
  render();
})();
