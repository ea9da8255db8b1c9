(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lmeval-data").textContent);
  var tip = document.getElementById("tip");
  function fmt(x, d) { return x === null ? "n/a" : x.toFixed(d); }
  function prob(x) { return x === null ? "n/a" : x.toPrecision(4); }
  function shown(s) { return JSON.stringify(s); }
  function tipText(unit, r) {
    var lines = [unit + " " + shown(r.label) + (r.label === r.text ? "" : "  text " + shown(r.text)),
      "surprisal " + fmt(r.surprisal_bits, 3) + " bits",
      "rank " + r.rank + "   prob " + prob(r.prob),
      "entropy " + fmt(r.entropy_bits, 3) + " bits"];
    if (r.topk.length) {
      lines.push("top " + r.topk.length + ":");
      r.topk.forEach(function (a) { lines.push("  " + shown(a.token) + " " + prob(a.prob)); });
    }
    return lines.join("\n");
  }
  function columnsFor(unit) { return [
    ["#", function (r) { return r.index; }, String],
    [unit, function (r) { return r.label; }, String, "t"],
    ["text", function (r) { return r.text; }, shown, "t"],
    ["surprisal (bits)", function (r) { return r.surprisal_bits; }, function (x) { return fmt(x, 3); }],
    ["rank", function (r) { return r.rank; }, String],
    ["prob", function (r) { return r.prob; }, prob],
    ["entropy (bits)", function (r) { return r.entropy_bits; }, function (x) { return fmt(x, 3); }],
    ["top-k", function (r) { return r.topk.map(function (a) { return shown(a.token) + " " + prob(a.prob); }).join(", "); }, String, "k"]
  ]; }
  function compare(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    return a < b ? -1 : 1;
  }
  function buildTable(section, doc) {
    var spans = section.querySelectorAll(".heat .tok");
    var columns = columnsFor(doc.unit);
    var table = document.createElement("table");
    var head = table.createTHead().insertRow();
    var body = table.createTBody();
    doc.rows.forEach(function (r, i) {
      var tr = body.insertRow();
      tr.dataset.i = i;
      columns.forEach(function (c) {
        var td = tr.insertCell();
        td.textContent = c[2](c[1](r));
        if (c[3]) td.className = c[3];
      });
      tr.addEventListener("mouseenter", function () { spans[i].classList.add("hl"); });
      tr.addEventListener("mouseleave", function () { spans[i].classList.remove("hl"); });
    });
    columns.forEach(function (c, k) {
      var th = document.createElement("th");
      th.textContent = c[0];
      th.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        head.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var trs = Array.prototype.slice.call(body.rows);
        trs.sort(function (x, y) {
          var a = c[1](doc.rows[x.dataset.i]), b = c[1](doc.rows[y.dataset.i]);
          return dir * compare(a, b) || x.dataset.i - y.dataset.i;
        });
        trs.forEach(function (tr) { body.appendChild(tr); });
      });
      head.appendChild(th);
    });
    section.querySelector(".table-slot").appendChild(table);
    spans.forEach(function (span, i) {
      var text = tipText(doc.unit, doc.rows[i]);
      span.setAttribute("aria-label", text);
      span.addEventListener("mousemove", function (e) {
        tip.textContent = text;
        tip.style.display = "block";
        tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
        tip.style.top = (e.clientY + 18) + "px";
      });
      span.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    });
  }
  document.querySelectorAll("section.doc").forEach(function (section, k) { buildTable(section, data[k]); });
  document.body.dataset.ready = "1";
})();
