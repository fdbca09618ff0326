// Colour scales of the document view. Numbers map to a ramp from white to the scale's strongest colour
// (its end: the largest value of the document; for excess loss, a diverging map centred at 0, blue above
// and red below, so that what Rho-1 selects reads as blue); classes map to fixed colours.
"use strict";

const RAMPS = {
  sequential: [[255, 255, 255], [122, 1, 119]],
  rate: [[255, 255, 255], [33, 102, 172]],
  diverging: [[178, 24, 43], [255, 255, 255], [33, 102, 172]],
};
const DYNAMICS = {"H->L": "#4575b4", "L->L": "#1a9850", "H->H": "#fdd835", "L->H": "#d73027"};

function mix(a, b, t) {
  return a.map((x, i) => Math.round(x + (b[i] - x) * t));
}

function rgb(c) {
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function conceptColor(id) {
  return `hsl(${(id * 137.508) % 360}, 70%, 78%)`;
}

// A scale for one column over the values of the document: {color(v), dark(v), legend: {...}}.
function makeScale(kind, values) {
  const present = values.filter((v) => v !== null && v !== undefined);
  if (kind === "category") {
    const classes = [...new Set(present)].sort((a, b) => (a > b ? 1 : -1));
    const color = (v) => (typeof v === "number" ? conceptColor(v) : DYNAMICS[v] || "#ccc");
    return {color, dark: () => false, legend: {kind, classes: classes.slice(0, 24).map((c) => [c, color(c)])}};
  }
  let lo = 0, hi = 1;
  if (kind === "diverging") {
    hi = present.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-12);
    lo = -hi;
  } else if (kind === "sequential") {
    lo = present.reduce((m, v) => Math.min(m, v), Infinity);
    hi = present.reduce((m, v) => Math.max(m, v), -Infinity);
    if (!(hi > lo)) hi = lo + 1e-12;
  }
  const ramp = RAMPS[kind];
  const t = (v) => Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
  const color = (v) => {
    if (kind !== "diverging") return rgb(mix(ramp[0], ramp[1], t(v)));
    const u = t(v);
    return rgb(u < 0.5 ? mix(ramp[0], ramp[1], u * 2) : mix(ramp[1], ramp[2], (u - 0.5) * 2));
  };
  const dark = (v) => (kind === "diverging" ? Math.abs(t(v) - 0.5) > 0.35 : t(v) > 0.6);
  const stops = kind === "diverging" ? [lo, 0, hi] : [lo, hi];
  return {color, dark, legend: {kind, stops, colors: stops.map(color), strongest: color(hi)}};
}

window.makeScale = makeScale;
window.conceptColor = conceptColor;
