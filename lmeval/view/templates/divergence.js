(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lmeval-data").textContent);
  var tip = document.getElementById("tip");
  function fmt(x, d) { return x === null ? "n/a" : x.toFixed(d); }
  function signed(x, d) { return x === null ? "n/a" : (x > 0 ? "+" : "") + x.toFixed(d); }
  function prob(x) { return x === null ? "n/a" : x.toPrecision(4); }
  function shown(s) { return JSON.stringify(s); }
  function tipText(doc, r) {
    return ["token " + shown(r.label) + (r.label === r.text ? "" : "  text " + shown(r.text)),
      "model    " + doc.model + ": " + fmt(r.surprisal_bits, 3) + " bits   p " + prob(r.prob),
      "baseline " + doc.baseline + ": " + fmt(r.surprisal_bits_baseline, 3) + " bits   p " + prob(r.prob_baseline),
      "delta surprisal " + signed(r.delta_bits, 3) + " bits   delta p " + signed(r.delta_p, 4),
      "KL(base||model) " + fmt(r.kl, 4) + " nats   KL(model||base) " + fmt(r.kl_reverse, 4) + " nats",
      "same top-1: " + (r.same_top1 ? "yes" : "no")].join("\n");
  }
  var columns = [
    ["#", function (r) { return r.index; }, String],
    ["token", function (r) { return r.label; }, String, "t"],
    ["text", function (r) { return r.text; }, shown, "t"],
    ["bits (model)", function (r) { return r.surprisal_bits; }, function (x) { return fmt(x, 3); }],
    ["bits (baseline)", function (r) { return r.surprisal_bits_baseline; }, function (x) { return fmt(x, 3); }],
    ["delta bits", function (r) { return r.delta_bits; }, function (x) { return signed(x, 3); }],
    ["delta p", function (r) { return r.delta_p; }, function (x) { return signed(x, 4); }],
    ["KL (nats)", function (r) { return r.kl; }, function (x) { return fmt(x, 4); }],
    ["KL reverse (nats)", function (r) { return r.kl_reverse; }, function (x) { return fmt(x, 4); }],
    ["same top-1", function (r) { return r.same_top1 ? 1 : 0; }, function (x) { return x ? "yes" : "no"; }]
  ];
  function compare(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    return a < b ? -1 : 1;
  }
  function buildTable(section, doc) {
    var spans = section.querySelectorAll(".heat .tok");
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
    columns.forEach(function (c) {
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
      var text = tipText(doc, doc.rows[i]);
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
