// Click a column header to sort by it; numbers sort as numbers, text naturally: the numbers inside it compare as
// numbers (C2 before C13, batch_size~4 before batch_size~16, lr~0.01 before lr~0.1).
const pieces = text => text.match(/\d+(?:\.\d+)?(?:e[-+]?\d+)?|\D+/gi) || [];
const natural = (a, b) => {
  const x = pieces(a), y = pieces(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const m = Number(x[i]), n = Number(y[i]);
    const order = !isNaN(m) && !isNaN(n) ? m - n : x[i].localeCompare(y[i]);
    if (order) return order;
  }
  return x.length - y.length;
};
document.querySelectorAll("table.sortable th").forEach(header => {
  const column = header.cellIndex;  // within its own table: a page has several sortable tables
  header.addEventListener("click", () => {
    const body = header.closest("table").tBodies[0];
    const ascending = header.dataset.order !== "asc";
    header.dataset.order = ascending ? "asc" : "desc";
    const text = row => row.cells[column].textContent.trim();
    const compare = (a, b) => {
      const x = Number(text(a)), y = Number(text(b));
      return text(a) !== "" && text(b) !== "" && !isNaN(x) && !isNaN(y) ? x - y : natural(text(a), text(b));
    };
    [...body.rows].sort((a, b) => compare(a, b) * (ascending ? 1 : -1)).forEach(row => body.appendChild(row));
  });
});
